"""Arrow schemas of every shard kind. A shard's columns are exactly these, in this order."""

import pyarrow as pa

from schemas.job import StageName

# The Hugging Face `datasets` Image feature's storage type: a shard holding this struct loads
# with `datasets.load_dataset("parquet", ...)` as images.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# Ingest: one row per source item that decoded into an acceptable image. `part` and `item` give
# the item's position in the source, which defines "first" among exact duplicates. A repeat of an
# image already seen in the same part keeps its row (so the group-by on image_id sees every
# occurrence) but not the bytes again: image.bytes is null there.
INGEST = pa.schema(
    [
        ("image_id", pa.string()),  # hex SHA-256 of the stored bytes
        ("uri", pa.string()),
        ("image", IMAGE_STRUCT),
        ("width", pa.int32()),  # after EXIF orientation
        ("height", pa.int32()),
        ("format", pa.string()),  # PIL format of the stored bytes: JPEG, PNG, WEBP, ...
        ("mode", pa.string()),  # PIL mode of the source image before RGB normalisation
        ("resized", pa.bool_()),  # true when max_side made us re-encode
        ("part", pa.int32()),
        ("item", pa.int32()),
        ("metadata", pa.string()),  # JSON object of the source's extra columns (caption, ...)
    ]
)

# Errors of any stage: the items that did not make it, and why.
ERRORS = pa.schema(
    [
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),  # a schemas.reasons.Reason value
        ("detail", pa.string()),
        ("part", pa.int32()),
        ("item", pa.int32()),
        ("metadata", pa.string()),
    ]
)

# Dedup, first pass: per distinct image of an ingest shard, the inputs of the global decisions.
DEDUP_FEATURES = pa.schema(
    [
        ("image_id", pa.string()),
        ("part", pa.int32()),
        ("item", pa.int32()),
        ("area", pa.int64()),  # pixels, for the representative rule
        # The PCA-hash input (a low-frequency DCT block), or the 64 PHash bits as 0/1.
        ("hash_features", pa.list_(pa.float32())),
        # SSCD-style copy descriptor, L2-normalised; null when the copy pass is skipped.
        ("copy_descriptor", pa.list_(pa.float16())),
    ]
)

# Dedup: one row per ingest occurrence, saying whether it stays and why not.
DEDUP = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("part", pa.int32()),
        ("item", pa.int32()),
        ("keep", pa.bool_()),
        ("reason", pa.string()),  # exact | pca_hash | copy | eval_contamination | null
        ("group_id", pa.string()),  # image_id of the group's representative; null if alone
        # What it duplicates: the representative's image_id, or "<eval set>:<image_id>".
        ("duplicate_of", pa.string()),
        ("similarity", pa.float32()),  # 1.0 exact; 1 - hamming/bits; cosine
    ]
)

# Embed: one row per kept image (crawl) or per distinct image (seed set), L2-normalised.
EMBED = pa.schema(
    [
        ("image_id", pa.string()),
        ("part", pa.int32()),  # the ingest part and item the image's bytes live in
        ("item", pa.int32()),
        ("embedding", pa.list_(pa.float16())),
    ]
)

# Cluster: every embedded crawl image's k-means cluster (the finest level when hierarchical).
CLUSTER = pa.schema(
    [
        ("image_id", pa.string()),
        ("part", pa.int32()),
        ("item", pa.int32()),
        ("cluster_id", pa.int32()),
        ("distance", pa.float32()),  # 1 - cosine to the centroid
    ]
)

# Retrieve: one row per (seed image, retrieved image) match. An image retrieved by several seeds
# has several rows; the curated stage keeps it once. For `as-is` rows the image is the seed image
# itself and part/item point into the seed set's cached ingest shards, not the crawl's.
RETRIEVE = pa.schema(
    [
        ("seed_set", pa.string()),
        ("seed_id", pa.string()),  # image_id of the seed image; null for cluster/balanced picks
        ("image_id", pa.string()),
        ("part", pa.int32()),
        ("item", pa.int32()),
        ("rank", pa.int32()),  # 0-based neighbour rank (knn), pick order otherwise
        ("similarity", pa.float32()),  # cosine to the seed (knn, as-is) or to the centroid
        ("method", pa.string()),  # as-is | knn | cluster | balanced
        ("cluster_id", pa.int32()),
    ]
)

# Curated: the training-ready dataset, one row per image, shuffled; loads with
# `datasets.load_dataset("parquet", ...)` with `image` as an Image feature.
CURATED = pa.schema(
    [
        ("image", IMAGE_STRUCT),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("seed_set", pa.string()),  # the seed set of the best match
        ("seed_id", pa.string()),  # the best-matching seed image, when the method has one
        ("similarity", pa.float32()),
        ("method", pa.string()),
        ("cluster_id", pa.int32()),
        ("matches", pa.int32()),  # retrieve rows that picked this image (collisions + 1)
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

SCHEMAS: dict[tuple[str, str], pa.Schema] = {
    (StageName.INGEST, "data"): INGEST,
    (StageName.INGEST, "errors"): ERRORS,
    (StageName.DEDUP_FEATURES, "data"): DEDUP_FEATURES,
    (StageName.DEDUP, "data"): DEDUP,
    (StageName.EMBED, "data"): EMBED,
    (StageName.EMBED, "errors"): ERRORS,
    (StageName.CLUSTER, "data"): CLUSTER,
    (StageName.RETRIEVE, "data"): RETRIEVE,
    (StageName.CURATED, "data"): CURATED,
}
