"""Client of the split EDEN deployment (eden-client --help, or python -m eden_client --help)."""
