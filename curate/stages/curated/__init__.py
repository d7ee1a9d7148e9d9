"""The curated stage: the selection shuffled into training shards with provenance, and its card."""
