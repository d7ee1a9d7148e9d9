"""Embed stage: decode and crop the kept images of a part, embed them, write an EMBED shard.

Decoding (`decode_part`) runs in CPU workers and hands the model uint8 pixels, a quarter of the
bytes of float input; normalisation happens on the model's device (`Embedder`), batched.
"""

import io
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from curate.core.devices import pick_device
from curate.core.shards import PartResult, shard_name, write_shard
from curate.core.storage import read_table
from curate.stages.embed.model import ModelSpec, load_backbone
from curate.stages.ingest.decode import to_rgb
from schemas.job import StageName
from schemas.reasons import Reason
from schemas.shards import EMBED, ERRORS

# timm / DINOv2 evaluation resize: short side to size / 0.875 (256 for a 224 crop), then crop.
_RESIZE_RATIO = 256 / 224
_INGEST_COLUMNS = ["image_id", "uri", "image", "part", "item", "metadata"]


@dataclass(frozen=True)
class EmbedInput:
    index: int  # the ingest part number
    ingest: Path  # INGEST shard
    # DEDUP shard of the same part: rows with keep = true are embedded. None: every row with
    # bytes (seed sets, which are not deduplicated; a repeat within a part has none).
    dedup: Path | None


@dataclass
class DecodedPart:
    """One part's images as model input, and the rows that could not be decoded."""

    index: int
    image_ids: list[str]
    parts: np.ndarray  # int32 [N]: where each image's bytes live in the ingest shards
    items: np.ndarray  # int32 [N]
    pixels: np.ndarray  # uint8 [N, 3, S, S]
    errors: pa.Table  # ERRORS rows, stage "embed"
    seconds: float = 0.0  # spent decoding

    @property
    def rows_in(self) -> int:
        return len(self.image_ids) + self.errors.num_rows


def resize_side(image_size: int) -> int:
    """The short side an image is resized to before its centre crop of `image_size`."""
    return math.floor(image_size * _RESIZE_RATIO)


def preprocess(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image -> uint8 [3, S, S]: upright RGB, short side to S*256/224 (bicubic), centre
    crop S. Raises on bytes Pillow cannot decode."""
    side = resize_side(image_size)
    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result stays >= side on
        # both axes, so a 12-megapixel photo costs a fraction of its full decode.
        img.draft("RGB", (side, side))
        rgb = to_rgb(ImageOps.exif_transpose(img))
    width, height = rgb.size
    scale = side / min(width, height)
    # As torchvision's Resize(int): the short side exactly `side`, the long one truncated.
    size = (side, int(height * scale)) if width <= height else (int(width * scale), side)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left = int(round((size[0] - image_size) / 2.0))
    top = int(round((size[1] - image_size) / 2.0))
    crop = rgb.crop((left, top, left + image_size, top + image_size))
    return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


def _rows_to_embed(part: EmbedInput) -> pa.Table:
    ingest = read_table(part.ingest, _INGEST_COLUMNS)
    if part.dedup is None:
        return ingest.filter(pc.is_valid(pc.struct_field(ingest.column("image"), "bytes")))
    decisions = read_table(part.dedup, ["part", "item", "keep"])
    same_rows = decisions.num_rows == ingest.num_rows and decisions.column("item").equals(
        ingest.column("item")
    )
    if not same_rows or not decisions.column("part").equals(ingest.column("part")):
        raise ValueError(
            f"dedup shard {part.dedup} does not match ingest shard {part.ingest} row for row "
            f"({decisions.num_rows} vs {ingest.num_rows} rows)"
        )
    return ingest.filter(decisions.column("keep").fill_null(False))


def _error_row(row: dict, reason: Reason, detail: str) -> dict:
    return {
        "uri": row["uri"],
        "stage": StageName.EMBED.value,
        "reason": str(reason),
        "detail": detail,
        "part": row["part"],
        "item": row["item"],
        "metadata": row["metadata"],
    }


def decode_part(part: EmbedInput, image_size: int) -> DecodedPart:
    """The images `part` embeds as uint8 [N, 3, S, S]; undecodable ones become error rows."""
    started = time.perf_counter()
    rows = _rows_to_embed(part).to_pylist()
    pixels = np.empty((len(rows), 3, image_size, image_size), dtype=np.uint8)
    decoded: list[dict] = []
    errors: list[dict] = []
    for row in rows:
        data = row["image"]["bytes"]
        if data is None:
            # Dedup keeps first occurrences, which always carry their bytes: a kept row without
            # them is a broken ingest shard, not an image to skip quietly.
            raise ValueError(
                f"{part.ingest}: kept row item {row['item']} ({row['image_id']}) has no bytes"
            )
        try:
            pixels[len(decoded)] = preprocess(data, image_size)
        except Image.DecompressionBombError as error:
            errors.append(_error_row(row, Reason.DECOMPRESSION_BOMB, str(error)))
            continue
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, ...
            errors.append(_error_row(row, Reason.DECODE_ERROR, f"{type(error).__name__}: {error}"))
            continue
        decoded.append(row)
    return DecodedPart(
        index=part.index,
        image_ids=[row["image_id"] for row in decoded],
        parts=np.array([row["part"] for row in decoded], dtype=np.int32),
        items=np.array([row["item"] for row in decoded], dtype=np.int32),
        pixels=pixels[: len(decoded)],
        errors=pa.Table.from_pylist(errors, schema=ERRORS),
        seconds=time.perf_counter() - started,
    )


class Embedder:
    """A backbone that turns uint8 crops into unit-norm float16 embeddings, batch by batch."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        batch_size: int = 64,
        device: str | None = None,
        compile: bool = False,
        num_threads: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.spec = spec
        self.batch_size = batch_size
        self.device = torch.device(device or pick_device())
        model = load_backbone(spec)
        # timm reads its fused-attention switch when a block is built; make sure every attention
        # layer uses torch's scaled_dot_product_attention (flash / memory-efficient kernels).
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
        self._cuda = self.device.type == "cuda"
        model = model.to(self.device)
        if self._cuda:
            model = model.to(memory_format=torch.channels_last)
        cfg = model.pretrained_cfg
        # Scaled to 0..255 so the uint8 input is normalised in one fused step on the device.
        self._mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1) * 255.0
        self.dim: int = int(model.num_features)
        self.model = model
        self._forward = torch.compile(model) if compile else model

    def _batch(self, pixels: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(pixels)
        if self._cuda:
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = (batch.float() - self._mean) / self._std
        if self._cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._cuda):
            features = self._forward(x)
        # bf16 compute leaves norms off 1, and cosine similarity needs unit norm.
        return F.normalize(features.float(), dim=-1).to(torch.float16)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, S, S] -> L2-normalised float16 [N, D]."""
        size = self.spec.img_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(
                f"expected uint8 pixels [N, 3, {size}, {size}], got {pixels.dtype} "
                f"{list(pixels.shape)}"
            )
        out = np.empty((len(pixels), self.dim), dtype=np.float16)
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                chunk = pixels[start : start + self.batch_size]
                out[start : start + len(chunk)] = self._batch(chunk).cpu().numpy()
        return out


def write_embed_part(decoded: DecodedPart, embeddings: np.ndarray, out_dir: Path) -> PartResult:
    """Write the part's EMBED shard (and ERRORS shard when some images failed)."""
    started = time.perf_counter()
    rows = len(decoded.image_ids)
    if embeddings.ndim != 2 or embeddings.shape[0] != rows:
        raise ValueError(f"part {decoded.index}: {rows} images but embeddings {embeddings.shape}")
    vectors = np.ascontiguousarray(embeddings, dtype=np.float16)
    offsets = np.arange(0, vectors.size + 1, max(1, vectors.shape[1]), dtype=np.int32)[: rows + 1]
    table = pa.table(
        {
            "image_id": pa.array(decoded.image_ids, type=pa.string()),
            "part": pa.array(decoded.parts, type=pa.int32()),
            "item": pa.array(decoded.items, type=pa.int32()),
            "embedding": pa.ListArray.from_arrays(
                offsets, pa.array(vectors.ravel(), type=pa.float16())
            ),
        },
        schema=EMBED,
    )
    name = shard_name(decoded.index)
    shards = {"data": write_shard(table, out_dir / name)}
    if decoded.errors.num_rows:
        shards["errors"] = write_shard(decoded.errors, out_dir / "errors" / name)
    reasons = Counter(decoded.errors.column("reason").to_pylist())
    return PartResult(
        part=decoded.index,
        rows_in=decoded.rows_in,
        rows_out=rows,
        shards=shards,
        error_counts=dict(reasons),
        seconds=time.perf_counter() - started,
    )
