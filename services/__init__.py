"""The surfaces above the library: the `curate` command line (and, later, the REST service)."""
