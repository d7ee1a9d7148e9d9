"""One package per pipeline stage, each exporting its stage object."""
