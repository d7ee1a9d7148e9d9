"""The contracts: shard schemas, job specs, reason codes and the catalog DDL."""
