"""WebDataset export of a curated dataset: tars of `<key>.<ext>` (the original image bytes) and
`<key>.json` (its provenance), streamed shard by shard, each tar written whole or not at all."""

import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from curate.core import storage
from curate.core.atomic import publish, temporary_name
from schemas.shards import CURATED

# Leading bytes of the formats ingest stores, and the extensions WebDataset decoders expect.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"WEBP", 8, "webp"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
)
_PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}
# Every curated column but the bytes, in the schema's order.
_PROVENANCE = [name for name in CURATED.names if name != "image"]
_TAR_NAME = re.compile(r"^\d{6}\.tar$")


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes (jpg, png, webp, ...), from their content."""
    for magic, offset, extension in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return extension
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except Exception as error:
        raise ValueError(f"not an image ({len(data)} bytes): {error}") from None
    return _PIL_EXTENSIONS.get(fmt, fmt.lower() or "bin")


def _samples(paths: list[Path]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, image bytes, provenance) of every curated row, in shard order, batch by batch."""
    for path in paths:
        shard = storage.parquet_file(path)
        for batch in shard.iter_batches(batch_size=256, columns=["image", *_PROVENANCE]):
            images = batch.column("image").field("bytes").to_pylist()
            provenance = batch.select(_PROVENANCE).to_pylist()
            for data, meta in zip(images, provenance, strict=True):
                key = meta["image_id"]
                # WebDataset splits a member name at its first dot into key and extension.
                if not key or "." in key or "/" in key:
                    raise ValueError(f"curated shard {path}: image_id {key!r} is not a usable key")
                if data is None:
                    raise ValueError(f"curated shard {path}: image {key} has no bytes")
                if meta["similarity"] is not None:
                    meta["similarity"] = round(float(meta["similarity"]), 6)
                yield key, data, meta


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and time: the same curated shards export to the same tar bytes.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


class _TarSequence:
    """Numbered tars in out_dir, each written to a temporary name and renamed when full."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.written: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._keys: set[str] = set()

    def add(self, key: str, data: bytes, meta: dict[str, Any]) -> None:
        if self._tar is None:
            path = self.out_dir / f"{len(self.written):06d}.tar"
            self._tmp = temporary_name(path)
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
            self._keys = set()
        if key in self._keys:
            raise ValueError(f"image {key} appears twice in tar {len(self.written):06d}")
        self._keys.add(key)
        _member(self._tar, f"{key}.{image_extension(data)}", data)
        _member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())

    @property
    def samples(self) -> int:
        return len(self._keys) if self._tar is not None else 0

    def close(self) -> None:
        """Finish the open tar and move it into place."""
        if self._tar is None or self._tmp is None:
            return
        self._tar.close()
        path = self.out_dir / f"{len(self.written):06d}.tar"
        publish(self._tmp, path)
        self.written.append(path)
        self._tar = self._tmp = None

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._tmp = None


def export_webdataset(
    curated_paths: list[Path],
    out_dir: Path,
    *,
    samples_per_tar: int = 10_000,
    progress: bool = False,
) -> list[Path]:
    """Write the curated shards as WebDataset tars out_dir/%06d.tar, in the shards' order.

    Each sample is `<image_id>.<ext>` (the original bytes; ext from their format) and
    `<image_id>.json` (provenance). Numbered tars left in out_dir by an earlier, larger export
    are removed, so out_dir holds exactly this export.
    """
    if samples_per_tar < 1:
        raise ValueError(f"samples_per_tar must be at least 1, got {samples_per_tar}")
    paths = [Path(p) for p in curated_paths]
    for path in paths:
        if not storage.exists(path):
            raise FileNotFoundError(f"curated shard {path} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(storage.parquet_file(p).metadata.num_rows for p in paths)
    tars = _TarSequence(out_dir)
    bar = tqdm(total=total, desc="webdataset", unit="img", disable=not progress)
    try:
        for key, data, meta in _samples(paths):
            tars.add(key, data, meta)
            bar.update(1)
            if tars.samples >= samples_per_tar:
                tars.close()
        tars.close()
    except BaseException:
        tars.abort()
        raise
    finally:
        bar.close()
    for stale in out_dir.iterdir():
        if _TAR_NAME.match(stale.name) and int(stale.name[:6]) >= len(tars.written):
            stale.unlink()
    return tars.written
