"""DDL of the DuckDB catalog. Tables only grow columns; a migration adds them with defaults (one
table was rebuilt once, to change its key: idempotency_keys)."""

from schemas.job import StageName

# POST /v1/jobs with an Idempotency-Key: the job it created and the body it was created from, per
# caller (scope: the API token's id; '' for a service without auth), so one caller's key never
# answers another's request. A catalog from before scopes is migrated by
# `curate.catalog_service.migrate_idempotency_keys` (its keys keep scope '').
IDEMPOTENCY_DDL = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope           VARCHAR NOT NULL,      -- api_tokens.token_id, or '' with auth off
    key             VARCHAR NOT NULL,
    request_sha256  VARCHAR NOT NULL,      -- of the request body as canonical JSON
    job_id          VARCHAR NOT NULL,
    created_at      TIMESTAMP NOT NULL,
    PRIMARY KEY (scope, key)
);
"""

CATALOG_DDL = (
    """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      VARCHAR PRIMARY KEY,
    spec        JSON NOT NULL,
    status      VARCHAR NOT NULL,          -- created|running|cancelling|done|failed|cancelled
    message     VARCHAR,
    created_at  TIMESTAMP NOT NULL,
    updated_at  TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS stages (
    job_id       VARCHAR NOT NULL,
    stage        VARCHAR NOT NULL,
    status       VARCHAR NOT NULL,         -- running | done | failed | cancelled
    parts_total  BIGINT,
    started_at   TIMESTAMP,
    finished_at  TIMESTAMP,
    seconds      DOUBLE DEFAULT 0,         -- summed over attempts
    metrics      JSON,
    message      VARCHAR,
    PRIMARY KEY (job_id, stage)
);
-- One row per committed part of a stage: the unit of exactly-once. Its shards and error counts
-- are registered in the same transaction.
CREATE TABLE IF NOT EXISTS parts (
    job_id    VARCHAR NOT NULL,
    stage     VARCHAR NOT NULL,
    part      INTEGER NOT NULL,
    rows_in   BIGINT NOT NULL,
    rows_out  BIGINT NOT NULL,
    errors    BIGINT NOT NULL,
    seconds   DOUBLE NOT NULL,
    committed_at TIMESTAMP NOT NULL,
    node      VARCHAR,                     -- the Ray node that ran it (NULL: recorded before)
    PRIMARY KEY (job_id, stage, part)
);
ALTER TABLE parts ADD COLUMN IF NOT EXISTS node VARCHAR;
CREATE TABLE IF NOT EXISTS shards (
    job_id    VARCHAR NOT NULL,
    stage     VARCHAR NOT NULL,
    kind      VARCHAR NOT NULL,            -- data | errors
    part      INTEGER NOT NULL,
    path      VARCHAR NOT NULL,            -- relative to the data root
    rows      BIGINT NOT NULL,
    bytes     BIGINT NOT NULL,
    checksum  VARCHAR NOT NULL,            -- sha256 of the file
    PRIMARY KEY (job_id, stage, kind, part)
);
-- Evaluation sets whose copies are removed from crawls (decontamination), by name.
CREATE TABLE IF NOT EXISTS eval_sets (
    name        VARCHAR PRIMARY KEY,
    location    VARCHAR NOT NULL,          -- folder, glob, URL list, .tar or .parquet
    created_at  TIMESTAMP NOT NULL
);
-- Seed sets whose look-alikes are retrieved from crawls, by name (stages/retrieve/seed_sets.py).
CREATE TABLE IF NOT EXISTS seed_sets (
    name        VARCHAR PRIMARY KEY,
    location    VARCHAR NOT NULL,          -- folder, glob, URL list, .tar or .parquet
    policy      VARCHAR NOT NULL,          -- e.g. as-is+knn:4, cluster:10000
    cap         BIGINT,                    -- most crawl images per policy step; NULL: no cap
    created_at  TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS error_counts (
    job_id  VARCHAR NOT NULL,
    stage   VARCHAR NOT NULL,
    part    INTEGER NOT NULL,
    reason  VARCHAR NOT NULL,
    count   BIGINT NOT NULL,
    PRIMARY KEY (job_id, stage, part, reason)
);
-- The service (services/api). API tokens: only the sha256 of the secret is kept; a revoked
-- token stays listed with the time it was revoked.
CREATE TABLE IF NOT EXISTS api_tokens (
    token_id    VARCHAR PRIMARY KEY,
    name        VARCHAR,
    scope       VARCHAR NOT NULL,          -- read | write (write implies read)
    sha256      VARCHAR NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    revoked_at  TIMESTAMP
);
"""
    + IDEMPOTENCY_DDL
    + """
-- The process running a job the service started: its latest launch only.
CREATE TABLE IF NOT EXISTS job_drivers (
    job_id      VARCHAR PRIMARY KEY,
    driver_id   VARCHAR NOT NULL,          -- one per launch: a stale launch's news is ignored
    kind        VARCHAR NOT NULL,          -- process | ray
    ref         VARCHAR,                   -- process: "pid:start ticks"; ray: submission id
    host        VARCHAR NOT NULL,
    started_at  TIMESTAMP NOT NULL,
    log_path    VARCHAR                    -- process drivers: stdout and stderr
);
"""
)

# Views over the registered shards of one job, created in the job's own schema (e.g. "demo".ingest).
# `{data}` and `{errors}` stand for read_parquet([...]) over the stage's registered shards, never a
# glob: a shard written by a killed run but not registered is not part of the job.
STAGE_VIEWS: dict[str, dict[str, str]] = {
    StageName.INGEST: {
        # One row per distinct image: the first occurrence in source order.
        "ingest": (
            "SELECT * FROM {data} "
            "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY part, item) = 1"
        ),
        # The later occurrences of an exact duplicate, and the first one they repeat.
        "ingest_duplicates": (
            "SELECT image_id, uri, part, item, first_value(uri) OVER w AS duplicate_of FROM {data} "
            "WINDOW w AS (PARTITION BY image_id ORDER BY part, item) "
            "QUALIFY row_number() OVER w > 1"
        ),
        "ingest_errors": "SELECT * FROM {errors}",
    },
    StageName.DEDUP: {
        # One row per ingest occurrence: keep, or the reason it goes and what it duplicates.
        "dedup": "SELECT * FROM {data}",
    },
    StageName.EMBED: {
        "embed": "SELECT * FROM {data}",
        "embed_errors": "SELECT * FROM {errors}",
    },
    StageName.CLUSTER: {
        "cluster": "SELECT * FROM {data}",
        "cluster_sizes": (
            "SELECT cluster_id, count(*) AS images FROM {data} GROUP BY cluster_id "
            "ORDER BY images DESC"
        ),
    },
    StageName.RETRIEVE: {"retrieve": "SELECT * FROM {data}"},
    # The image bytes stay out of the view: browsing provenance should not read megabytes.
    StageName.CURATED: {"curated": "SELECT * EXCLUDE (image) FROM {data}"},
}
