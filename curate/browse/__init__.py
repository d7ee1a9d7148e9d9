"""Browsing a job's results: the queries behind the REST results and image endpoints, as pure
functions over the catalog, the job's shards and a per-job browse index (no HTTP here)."""
