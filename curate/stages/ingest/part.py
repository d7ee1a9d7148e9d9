"""Ingest one source part into one image shard and one errors shard."""

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from curate.core.shards import PartResult, shard_name, write_shard
from curate.core.storage import dataset, is_remote
from curate.settings import CrawlSettings
from curate.stages.ingest.crawl import Crawler
from curate.stages.ingest.decode import AcceptedImage, Rejected, decode_image
from curate.stages.ingest.items import Item, read_local_items
from curate.stages.ingest.sources import SourcePart
from schemas.job import IngestOptions, StageName
from schemas.shards import ERRORS, INGEST

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tif"}


@dataclass(frozen=True)
class Outcome:
    item: int
    uri: str
    metadata: str
    result: AcceptedImage | Rejected


def _decode(data: bytes | Rejected, options: IngestOptions) -> AcceptedImage | Rejected:
    if isinstance(data, Rejected):
        return data
    try:
        return decode_image(data, options)
    except Rejected as rejected:
        return rejected


def _local_outcomes(part: SourcePart, options: IngestOptions) -> list[Outcome]:
    # Local reads are cheap next to decoding, and a worker owns one CPU: a plain loop is fastest.
    items: Iterable[Item] = read_local_items(part)
    return [
        Outcome(index, uri, metadata, _decode(data, options))
        for index, (uri, metadata, data) in enumerate(items)
    ]


async def _crawled_outcomes(
    part: SourcePart, options: IngestOptions, crawl: CrawlSettings
) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    # Decoding runs beside the event loop (Pillow releases the GIL) so fetches keep flowing.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as decoder:
        async with Crawler(crawl) as crawler:

            async def one(index: int, url: str, metadata: str) -> Outcome:
                fetched = await crawler.fetch(url)
                if fetched.reason is not None:
                    return Outcome(index, url, metadata, Rejected(fetched.reason, fetched.detail))
                assert fetched.data is not None
                result = await loop.run_in_executor(decoder, _decode, fetched.data, options)
                return Outcome(index, url, metadata, result)

            return await asyncio.gather(
                *(one(index, url, metadata) for index, (url, metadata) in enumerate(part.items))
            )


def _shard_tables(part: SourcePart, outcomes: list[Outcome]) -> tuple[pa.Table, pa.Table]:
    images: list[dict] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for outcome in outcomes:
        result = outcome.result
        if isinstance(result, Rejected):
            errors.append(
                {
                    "uri": outcome.uri,
                    "stage": StageName.INGEST.value,
                    "reason": str(result.reason),
                    "detail": result.detail,
                    "part": part.index,
                    "item": outcome.item,
                    "metadata": outcome.metadata,
                }
            )
            continue
        # A repeat within the part keeps its row for the group-by on image_id, not its bytes.
        repeat = result.image_id in seen
        seen.add(result.image_id)
        extension = _EXTENSIONS.get(result.format, result.format.lower())
        images.append(
            {
                "image_id": result.image_id,
                "uri": outcome.uri,
                "image": {
                    "bytes": None if repeat else result.data,
                    "path": f"{result.image_id}.{extension}",
                },
                "width": result.width,
                "height": result.height,
                "format": result.format,
                "mode": result.mode,
                "resized": result.resized,
                "part": part.index,
                "item": outcome.item,
                "metadata": outcome.metadata,
            }
        )
    return pa.Table.from_pylist(images, schema=INGEST), pa.Table.from_pylist(errors, schema=ERRORS)


def ingest_part(
    part: SourcePart, options: IngestOptions, crawl: CrawlSettings, stage_dir: Path
) -> PartResult:
    """Fetch, validate and hash every item of `part`; write its image and errors shards."""
    started = time.perf_counter()
    if part.kind == "urls":
        outcomes = asyncio.run(_crawled_outcomes(part, options, crawl))
    else:
        outcomes = _local_outcomes(part, options)
    images, errors = _shard_tables(part, outcomes)
    name = shard_name(part.index)
    shards = {
        "data": write_shard(images, stage_dir / name),
        "errors": write_shard(errors, stage_dir / "errors" / name),
    }
    reasons = Counter(errors.column("reason").to_pylist())
    return PartResult(
        part=part.index,
        rows_in=len(outcomes),
        rows_out=images.num_rows,
        shards=shards,
        error_counts=dict(reasons),
        seconds=time.perf_counter() - started,
    )


def describe_part(part: SourcePart) -> str:
    """A short label for progress and error messages."""
    if part.path:
        return f"part {part.index} ({part.path})"
    return f"part {part.index} ({part.size} items)"


def summarize_ingest(data_shards: list[Path]) -> dict[str, int]:
    """Stage metrics over the registered image shards: occurrences, distinct images, repeats."""
    if not data_shards:
        return {"occurrences": 0, "images": 0, "exact_duplicates": 0}
    # Imported here, in the driver: the workers that import this module for their parts never
    # query, and DuckDB would add to every worker's start-up.
    import duckdb

    # Reads only the image_id column; DuckDB streams it and spills the distinct set if it must.
    # Shards in an object store are scanned in place through a pyarrow dataset; local ones DuckDB
    # reads itself, sparing a local run pyarrow.dataset's import (it brings pandas: 0.5 s).
    with duckdb.connect() as con:
        if any(is_remote(path) for path in data_shards):
            shards = con.from_arrow(dataset(data_shards))
        else:
            shards = con.read_parquet([str(path) for path in data_shards])
        ((occurrences, images),) = shards.aggregate("count(*), count(DISTINCT image_id)").fetchall()
    return {"occurrences": occurrences, "images": images, "exact_duplicates": occurrences - images}
