"""Ray orchestration: job specs become stages of Ray tasks over `curate` functions."""
