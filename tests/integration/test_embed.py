"""Embed stage: preprocessing, the embedder, per-part decoding and shards, the Ray pipeline."""

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import v2

from curate.core.shards import shard_name, write_shard
from curate.stages.embed.embedder import (
    Embedder,
    EmbedInput,
    decode_part,
    preprocess,
    resize_side,
    write_embed_part,
)
from curate.stages.embed.model import ModelSpec, WeightsError, check_spec, load_backbone
from curate.stages.embed.stage import STAGE as EMBED_STAGE
from curate.stages.embed.stage import EmbedInputs
from pipelines.executor import RayCompute
from pipelines.failures import StageFailed
from schemas.shards import DEDUP, EMBED, ERRORS, INGEST
from tests.images import encode, jpeg, photo, truncated_jpeg

ARCH = "vit_tiny_patch16_224"
SIZE = 32
SPEC = ModelSpec(ARCH, None, allow_random=True, img_size=SIZE)

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM WEIGHTS:RuntimeWarning")


def _reference_crop(img: Image.Image, size: int) -> np.ndarray:
    """torchvision's evaluation transform, the one `preprocess` must agree with."""
    steps = v2.Compose(
        [
            v2.Resize(resize_side(size), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(size),
            v2.PILToTensor(),
        ]
    )
    return steps(img).numpy()


def test_preprocess_resizes_short_side_and_crops_the_centre() -> None:
    # A wide image: blue | red | blue thirds. The centre crop must be all red.
    stripes = np.zeros((90, 270, 3), dtype=np.uint8)
    stripes[:, :, 2] = 255
    stripes[:, 90:180] = (255, 0, 0)
    wide = Image.fromarray(stripes)
    crop = preprocess(encode(wide, "PNG"), 64)
    assert crop.shape == (3, 64, 64) and crop.dtype == np.uint8
    assert (crop[0] == 255).all() and (crop[2] == 0).all()
    np.testing.assert_array_equal(crop, _reference_crop(wide, 64))

    tall = photo(width=50, height=120, seed=3)
    np.testing.assert_array_equal(
        preprocess(encode(tall, "PNG"), SIZE), _reference_crop(tall, SIZE)
    )


def test_preprocess_applies_exif_orientation_and_rejects_junk() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(photo(120, 60, seed=4), "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert upright.size == (60, 120)
    np.testing.assert_array_equal(preprocess(data, SIZE), _reference_crop(upright, SIZE))
    with pytest.raises(OSError):
        preprocess(truncated_jpeg(), SIZE)
    with pytest.raises(OSError):
        preprocess(b"<html>not an image</html>", SIZE)


def test_embeddings_are_unit_float16_and_match_a_direct_forward() -> None:
    embedder = Embedder(SPEC, batch_size=2, device="cpu")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 3, SIZE, SIZE), dtype=np.uint8)
    out = embedder(pixels)
    assert out.dtype == np.float16 and out.shape == (5, embedder.dim) == (5, 192)
    np.testing.assert_allclose(np.linalg.norm(out.astype(np.float32), axis=1), 1.0, atol=2e-3)

    model = load_backbone(SPEC)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        direct = F.normalize(model((torch.from_numpy(pixels) / 255.0 - mean) / std), dim=-1)
    np.testing.assert_allclose(out.astype(np.float32), direct.numpy(), atol=2e-3)
    # One batch or several: the same vectors (up to the summation order of the kernels).
    whole = Embedder(SPEC, batch_size=64, device="cpu")(pixels)
    np.testing.assert_allclose(whole.astype(np.float32), out.astype(np.float32), atol=1e-3)

    with pytest.raises(ValueError, match=r"uint8 pixels \[N, 3, 32, 32\]"):
        embedder(pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\], got uint8 \[5, 3, 16, 16\]"):
        embedder(pixels[:, :, :16, :16])


def _ingest_shard(path: Path, part: int, images: list[bytes | None]) -> Path:
    """An INGEST shard; None repeats the previous image's id without bytes (a repeat)."""
    rows = []
    image_id = ""
    for item, data in enumerate(images):
        if data is not None:
            image_id = hashlib.sha256(data).hexdigest()
        rows.append(
            {
                "image_id": image_id,
                "uri": f"file:///crawl/{part}/{item}.jpg",
                "image": {"bytes": data, "path": f"{image_id}.jpg"},
                "width": 48,
                "height": 40,
                "format": "JPEG",
                "mode": "RGB",
                "resized": False,
                "part": part,
                "item": item,
                "metadata": '{"caption": "x"}',
            }
        )
    write_shard(pa.Table.from_pylist(rows, schema=INGEST), path)
    return path


def _dedup_shard(path: Path, ingest: Path, keep: list[bool]) -> Path:
    table = pq.read_table(ingest)
    rows = [
        {
            "image_id": row["image_id"],
            "uri": row["uri"],
            "part": row["part"],
            "item": row["item"],
            "keep": kept,
            "reason": None if kept else "exact",
            "group_id": None,
            "duplicate_of": None,
            "similarity": None,
        }
        for row, kept in zip(table.to_pylist(), keep, strict=True)
    ]
    write_shard(pa.Table.from_pylist(rows, schema=DEDUP), path)
    return path


def test_decode_part_keeps_dedup_survivors_and_reports_bad_bytes(tmp_path: Path) -> None:
    images = [jpeg(48, 40, seed=0), None, truncated_jpeg(1), b"GIF89a broken", jpeg(60, 40, seed=2)]
    ingest = _ingest_shard(tmp_path / "ingest.parquet", 7, images)
    dedup = _dedup_shard(tmp_path / "dedup.parquet", ingest, [True, False, True, True, False])

    decoded = decode_part(EmbedInput(7, ingest, dedup), SIZE)
    assert decoded.image_ids == [hashlib.sha256(images[0]).hexdigest()]
    assert decoded.items.tolist() == [0] and decoded.parts.tolist() == [7]
    assert decoded.pixels.shape == (1, 3, SIZE, SIZE) and decoded.rows_in == 3
    np.testing.assert_array_equal(decoded.pixels[0], preprocess(images[0], SIZE))
    assert decoded.errors.schema == ERRORS
    errors = decoded.errors.to_pylist()
    assert [(e["item"], e["reason"], e["stage"]) for e in errors] == [
        (2, "decode_error", "embed"),
        (3, "decode_error", "embed"),
    ]
    assert errors[0]["uri"] == "file:///crawl/7/2.jpg" and errors[0]["metadata"]

    # Seed sets: no decisions, every row that carries bytes (the in-part repeat has none).
    seeds = decode_part(EmbedInput(7, ingest, None), SIZE)
    assert seeds.items.tolist() == [0, 4] and seeds.errors.num_rows == 2

    other = _ingest_shard(tmp_path / "other.parquet", 8, images[:2])
    with pytest.raises(ValueError, match="does not match ingest shard"):
        decode_part(EmbedInput(7, other, dedup), SIZE)


def test_write_embed_part_writes_embed_and_error_shards(tmp_path: Path) -> None:
    images = [jpeg(48, 40, seed=0), jpeg(48, 40, seed=1), b"junk"]
    ingest = _ingest_shard(tmp_path / "ingest.parquet", 3, images)
    decoded = decode_part(EmbedInput(3, ingest, None), SIZE)
    embeddings = Embedder(SPEC, device="cpu")(decoded.pixels)
    result = write_embed_part(decoded, embeddings, tmp_path / "embed")

    assert (result.part, result.rows_in, result.rows_out) == (3, 3, 2)
    assert result.error_counts == {"decode_error": 1}
    table = pq.read_table(result.shards["data"].path)
    assert result.shards["data"].path == tmp_path / "embed" / shard_name(3)
    assert table.schema == EMBED and table.column("item").to_pylist() == [0, 1]
    stored = np.array(table.column("embedding").to_pylist(), dtype=np.float16)
    np.testing.assert_array_equal(stored, embeddings)
    assert pq.read_table(result.shards["errors"].path).num_rows == 1

    clean = decode_part(
        EmbedInput(4, _ingest_shard(tmp_path / "b.parquet", 4, images[:1]), None), SIZE
    )
    result = write_embed_part(clean, Embedder(SPEC, device="cpu")(clean.pixels), tmp_path / "embed")
    assert (
        set(result.shards) == {"data"}
        and not (tmp_path / "embed/errors/part-000004.parquet").exists()
    )
    with pytest.raises(ValueError, match="1 images but embeddings"):
        write_embed_part(clean, embeddings, tmp_path / "embed")


def embed_parts(
    inputs, spec, *, out_dir, image_size, batch_size, compile, done, commit, parts_total, progress
) -> None:
    """The embed stage's part work through the executor, as a job runs it: the model checked
    first (the stage's `check`), then the parts through the pool of model workers."""
    assert image_size == spec.img_size
    check_spec(spec)
    RayCompute(progress).map_parts(
        EMBED_STAGE,
        EmbedInputs(spec, out_dir, batch_size, compile),
        inputs,
        label="embed",
        commit=commit,
        done=frozenset(done),
        total=parts_total,
    )


def _parts(tmp_path: Path, count: int) -> list[EmbedInput]:
    inputs = []
    for part in range(count):
        images = [jpeg(64, 48, seed=10 * part + i) for i in range(3)] + [b"junk"]
        ingest = _ingest_shard(tmp_path / "ingest" / shard_name(part), part, images)
        dedup = _dedup_shard(
            tmp_path / "dedup" / shard_name(part), ingest, [True, True, False, True]
        )
        inputs.append(EmbedInput(part, ingest, dedup))
    return inputs


def test_embed_parts_on_ray_commits_each_part_once_and_skips_done(
    ray_local, tmp_path: Path
) -> None:
    inputs = _parts(tmp_path, 4)
    out = tmp_path / "embed"
    committed = []

    def run(done: set[int]) -> None:
        embed_parts(
            inputs,
            SPEC,
            out_dir=out,
            image_size=SIZE,
            batch_size=2,
            compile=False,
            done=done,
            commit=committed.append,
            parts_total=len(inputs),
            progress=False,
        )

    run({1})
    assert sorted(r.part for r in committed) == [0, 2, 3]
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [shard_name(i) for i in (0, 2, 3)]
    assert all(r.rows_out == 2 and r.error_counts == {"decode_error": 1} for r in committed)

    # The actor's (seeded random) model embeds exactly as one built here.
    decoded = decode_part(inputs[2], SIZE)
    expected = Embedder(SPEC, device="cpu")(decoded.pixels)
    stored = pq.read_table(out / shard_name(2)).column("embedding").to_pylist()
    np.testing.assert_allclose(np.array(stored, dtype=np.float32), expected, atol=2e-3)

    committed.clear()
    run({0, 2, 3})
    assert [r.part for r in committed] == [1]
    committed.clear()
    run({0, 1, 2, 3})
    assert committed == []


def test_embed_parts_failures_name_the_part_or_the_weights(ray_local, tmp_path: Path) -> None:
    inputs = _parts(tmp_path, 1) + [EmbedInput(5, tmp_path / "missing.parquet", None)]
    options = dict(
        out_dir=tmp_path / "embed",
        image_size=SIZE,
        batch_size=4,
        compile=False,
        parts_total=None,
        progress=False,
    )
    committed = []
    with pytest.raises(StageFailed, match=r"embed failed on part 5 \(.*missing.parquet\)"):
        embed_parts(inputs, SPEC, done=set(), commit=committed.append, **options)
    with pytest.raises(WeightsError, match="CURATE_EMBED_WEIGHTS"):
        embed_parts(
            inputs,
            ModelSpec(ARCH, None, img_size=SIZE),
            done=set(),
            commit=committed.append,
            **options,
        )
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StageFailed, match="loading model.*cannot read embedding weights"):
            embed_parts(
                inputs,
                ModelSpec(ARCH, broken, img_size=SIZE),
                done=set(),
                commit=committed.append,
                **options,
            )
