"""Client of the split EDEN deployment (python -m client --help)."""
