"""The ingest stage: read a source, fetch and validate every item, write image shards."""
