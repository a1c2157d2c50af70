"""Sub-commands of python -m client: video and batch commands (issue 3)."""


def register(sub) -> None:
    """Add this module's sub-commands to the argparse sub-parsers ``sub`` (called by client.cli.main)."""
