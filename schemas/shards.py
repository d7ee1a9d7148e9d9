"""Arrow schemas of every shard kind. A shard's columns are exactly these, in this order."""

import pyarrow as pa

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

SCHEMAS: dict[tuple[str, str], pa.Schema] = {
    ("ingest", "data"): INGEST,
    ("ingest", "errors"): ERRORS,
}
