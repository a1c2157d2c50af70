"""Sub-commands of python -m client: operations commands: status, scale, models (issue 4)."""


def register(sub) -> None:
    """Add this module's sub-commands to the argparse sub-parsers ``sub`` (called by client.cli.main)."""
