"""The trainer's data side: multi-crop views, iBOT masks, and the curated-shard loader."""

import hashlib
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from curate.catalog import Catalog
from curate.core.shards import PartResult, write_shard
from curate.stages.ingest.decode import load_rgb
from curate.train import augment, data
from curate.train.augment import MaskingConfig, MultiCrop, MultiCropConfig, block_masks
from curate.train.data import DataPosition, TrainLoader
from curate.train.shards import ShardsError, resolve_shards
from schemas.job import parse_job_spec
from schemas.shards import CURATED
from tests.images import jpeg, photo, truncated_jpeg

CROPS = MultiCropConfig(global_size=32, local_size=16, n_local=2)
MASKING = MaskingConfig()
PATCH = 8


def curated_table(images: list[bytes | None], prefix: str) -> pa.Table:
    rows = [
        {
            "image": {"bytes": image, "path": f"{prefix}-{i}.jpg"},
            "image_id": f"{prefix}-{i}",
            "uri": f"file://{prefix}/{i}",
        }
        for i, image in enumerate(images)
    ]
    return pa.Table.from_pylist(rows, schema=CURATED)


def write_shards(folder: Path, sizes: list[int], seed: int = 0) -> list[Path]:
    """Curated shards of distinct small JPEGs, `sizes[i]` rows in shard i."""
    paths = []
    for part, size in enumerate(sizes):
        images = [jpeg(64, 48, seed=seed + 1000 * part + i) for i in range(size)]
        path = folder / f"part-{part:06d}.parquet"
        write_shard(curated_table(images, f"s{part}"), path)
        paths.append(path)
    return paths


def loader(files: list[Path], **options) -> TrainLoader:
    args = dict(
        batch_size=4,
        rank=0,
        world_size=1,
        seed=7,
        crops=CROPS,
        masking=MASKING,
        patch_size=PATCH,
    )
    return TrainLoader(files, **{**args, **options})


def take(train_loader: TrainLoader, n: int) -> list[data.Batch]:
    batches = iter(train_loader)
    return [next(batches) for _ in range(n)]


def stream_digests(train_loader: TrainLoader, pass_index: int) -> list[str]:
    """SHA-256 of each image this rank uses in one pass, in stream order."""
    stream = train_loader._stream
    return [
        hashlib.sha256(image).hexdigest()
        for _, image in stream.rows(pass_index, 0, lambda row: True)
    ]


def same_batches(a: list[data.Batch], b: list[data.Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.global_crops, y.global_crops)
        and torch.equal(x.local_crops, y.local_crops)
        and torch.equal(x.masks, y.masks)
        for x, y in zip(a, b, strict=True)
    )


# -- augmentation -------------------------------------------------------------------------


def test_view_probabilities_match_the_paper():
    multicrop = MultiCrop(MultiCropConfig())
    rng = random.Random(0)
    draws = [multicrop.draw((640, 480), rng) for _ in range(3000)]

    def share(views, test) -> float:
        return sum(test(v) for v in views) / len(views)

    global_1 = [d[0] for d in draws]
    global_2 = [d[1] for d in draws]
    local = [v for d in draws for v in d[2:]]
    assert all(len(d) == 10 for d in draws)
    blurred = lambda v: v.blur_sigma is not None  # noqa: E731
    solarised = lambda v: v.solarize  # noqa: E731
    assert share(global_1, blurred) == 1.0
    assert share(global_2, blurred) == pytest.approx(0.1, abs=0.02)
    assert share(local, blurred) == pytest.approx(0.5, abs=0.015)
    assert share(global_2, solarised) == pytest.approx(0.2, abs=0.025)
    assert share(global_1, solarised) == 0 and share(local, solarised) == 0
    every = global_1 + global_2 + local
    assert share(every, lambda v: v.flip) == pytest.approx(0.5, abs=0.015)
    assert share(every, lambda v: v.jitter is not None) == pytest.approx(0.8, abs=0.015)
    assert share(every, lambda v: v.grayscale) == pytest.approx(0.2, abs=0.015)
    sigmas = [v.blur_sigma for v in every if v.blur_sigma is not None]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    jitters = [v.jitter for v in every if v.jitter is not None]
    assert all(0.6 <= j.brightness <= 1.4 and 0.6 <= j.contrast <= 1.4 for j in jitters)
    assert all(0.8 <= j.saturation <= 1.2 and -0.1 <= j.hue <= 0.1 for j in jitters)
    assert len({j.order for j in jitters}) == 24, "jitter order is a random permutation"


def test_crop_boxes_cover_the_configured_scales():
    rng = random.Random(1)
    for scale in ((0.32, 1.0), (0.05, 0.32)):
        areas, ratios = [], []
        for _ in range(2000):
            top, left, h, w = augment.resized_crop_box(400, 300, scale, rng)
            assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
            areas.append(h * w / (400 * 300))
            ratios.append(w / h)
        # Rounding to whole pixels moves the area a little past the bounds.
        assert scale[0] * 0.97 <= min(areas) and max(areas) <= scale[1] * 1.01
        assert min(areas) < scale[0] + 0.05 and max(areas) > scale[1] - 0.05
        assert 0.74 <= min(ratios) and max(ratios) <= 1.35


def test_gaussian_blur_matches_torchvision():
    img = photo(80, 60, seed=3)
    for sigma in (0.1, 0.7, 2.0):
        ours = np.asarray(augment.gaussian_blur(img, sigma), dtype=np.int16)
        reference = TF.gaussian_blur(TF.pil_to_tensor(img), [9, 9], [sigma, sigma])
        theirs = reference.permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(ours - theirs).max() <= 1, sigma


def test_apply_view_blurs_and_solarises_when_asked():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    plain = augment.ViewParams((0, 0, 64, 64), 64, False, None, False, None, False)
    blurred = augment.ViewParams((0, 0, 64, 64), 64, False, None, False, 2.0, False)
    solarised = augment.ViewParams((0, 0, 64, 64), 64, False, None, False, None, True)
    a = augment.apply_view(noise, plain)
    b = augment.apply_view(noise, blurred)
    s = augment.apply_view(noise, solarised)
    assert a.dtype == torch.float32 and a.shape == (3, 64, 64)
    assert b.diff(dim=2).abs().mean() < 0.3 * a.diff(dim=2).abs().mean()
    mean = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    pixels_a = torch.round((a * std + mean) * 255)
    pixels_s = torch.round((s * std + mean) * 255)
    expected = torch.where(pixels_a >= 128, 255 - pixels_a, pixels_a)
    assert torch.equal(pixels_s, expected)


def test_multicrop_views_are_normalised_and_seeded():
    multicrop = MultiCrop(CROPS)
    img = photo(90, 70, seed=5)
    globals_, locals_ = multicrop(img, random.Random(11))
    again, _ = multicrop(img, random.Random(11))
    other, _ = multicrop(img, random.Random(12))
    assert [g.shape for g in globals_] == [(3, 32, 32)] * 2
    assert [v.shape for v in locals_] == [(3, 16, 16)] * 2
    assert all(v.dtype == torch.float32 for v in globals_ + locals_)
    assert all(torch.equal(x, y) for x, y in zip(globals_, again, strict=True))
    assert not torch.equal(globals_[0], other[0])
    copied, _ = pickle.loads(pickle.dumps(multicrop))(img, random.Random(11))
    assert torch.equal(copied[1], globals_[1]), "loader workers get a pickled copy"
    with pytest.raises(ValueError, match="RGB"):
        multicrop(img.convert("L"), random.Random(0))
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropConfig(local_scale=(0.0, 0.3))


def test_block_masks_ratio_and_share_of_masked_rows():
    grid = 14
    masks = block_masks(400, grid, MaskingConfig(), random.Random(0))
    assert masks.dtype == torch.bool and masks.shape == (400, grid * grid)
    counts = masks.sum(dim=1)
    masked = counts > 0
    assert int(masked.sum()) == 200, "exactly int(n * probability) rows are masked"
    ratios = counts[masked].float() / (grid * grid)
    assert ratios.min() >= 0.09 and ratios.max() <= 0.5
    assert float(ratios.mean()) == pytest.approx(0.3, abs=0.03)
    # Masked rows land anywhere, not only in the first half.
    assert 0 < int(masked[:200].sum()) < 200
    # Blocks, not scattered patches: most masked patches have a masked 4-neighbour.
    grids = masks.view(-1, grid, grid)
    neighbour = torch.zeros_like(grids)
    neighbour[:, 1:] |= grids[:, :-1]
    neighbour[:, :-1] |= grids[:, 1:]
    neighbour[:, :, 1:] |= grids[:, :, :-1]
    neighbour[:, :, :-1] |= grids[:, :, 1:]
    assert (grids & neighbour).sum() > 0.95 * grids.sum()

    assert not block_masks(10, grid, MaskingConfig(probability=0.0), random.Random(0)).any()
    full = block_masks(10, grid, MaskingConfig(probability=1.0), random.Random(0))
    assert bool((full.sum(dim=1) > 0).all())
    with pytest.raises(ValueError, match="ratio"):
        MaskingConfig(ratio=(0.6, 0.2))


# -- the loader ---------------------------------------------------------------------------


def test_batch_shapes_dtypes_and_view_major_order(tmp_path):
    files = write_shards(tmp_path, [6, 6])
    train_loader = loader(files, batch_size=3)
    (batch,) = take(train_loader, 1)
    grid = 32 // PATCH
    assert batch.global_crops.shape == (6, 3, 32, 32) and batch.global_crops.dtype == torch.float32
    assert batch.local_crops.shape == (6, 3, 16, 16) and batch.local_crops.dtype == torch.float32
    assert batch.masks.shape == (6, grid * grid) and batch.masks.dtype == torch.bool
    assert batch.bad_images == 0
    assert int((batch.masks.sum(dim=1) > 0).sum()) == 3

    # Rebuild the first batch image by image: row i's view v sits at v * B + i.
    stream = train_loader._stream
    rows = list(stream.rows(0, 0, lambda row: row < 3))
    multicrop = MultiCrop(CROPS)
    for i, (row, image) in enumerate(rows):
        globals_, locals_ = multicrop(load_rgb(image), random.Random(f"crop:7:0:0:{row}"))
        for view in range(2):
            assert torch.equal(batch.global_crops[view * 3 + i], globals_[view])
            assert torch.equal(batch.local_crops[view * 3 + i], locals_[view])

    no_locals = loader(files, crops=MultiCropConfig(32, 16, n_local=0))
    (batch,) = take(no_locals, 1)
    assert batch.local_crops.shape == (0, 3, 16, 16)


def test_same_batches_whatever_the_worker_count(tmp_path):
    files = write_shards(tmp_path, [5, 7, 4])
    in_process = take(loader(files, num_workers=0), 5)
    two_workers = take(loader(files, num_workers=2), 5)
    assert same_batches(in_process, two_workers)
    assert not torch.equal(in_process[0].global_crops, in_process[1].global_crops)


def test_ranks_see_disjoint_images_and_equal_batch_counts(tmp_path):
    # Uneven shards and several windows per shard (row groups of 3, windows of 6 rows).
    folder = tmp_path / "shards"
    files = []
    for part, size in enumerate([13, 7, 11, 4, 9]):
        images = [jpeg(64, 48, seed=1000 * part + i) for i in range(size)]
        path = folder / f"part-{part}.parquet"
        folder.mkdir(exist_ok=True)
        pq.write_table(curated_table(images, f"s{part}"), path, row_group_size=3)
        files.append(path)
    ranks = [loader(files, rank=r, world_size=2, window_rows=6) for r in (0, 1)]
    for pass_index in range(3):
        counts = {r.batches_per_pass(pass_index) for r in ranks}
        assert len(counts) == 1
        (per_pass,) = counts
        used = [set(stream_digests(r, pass_index)) for r in ranks]
        assert all(len(u) == per_pass * 4 for u in used)
        assert not used[0] & used[1]
        # The ragged tail stays below one batch (plus the ±1 row of the split) per rank.
        assert 44 - len(used[0] | used[1]) < 2 * (4 + 1)
    for r in ranks:
        batches = iter(r)
        for _ in range(r.batches_per_pass(0)):
            next(batches)
        assert r.position == DataPosition(1, 0)


def test_one_row_group_still_feeds_every_rank(tmp_path):
    # 30 images in a single row group: the one window is split between the three ranks.
    folder = tmp_path / "shards"
    folder.mkdir()
    images = [jpeg(64, 48, seed=i) for i in range(30)]
    pq.write_table(curated_table(images, "one"), folder / "part-0.parquet")
    files = [folder / "part-0.parquet"]
    ranks = [loader(files, rank=r, world_size=3) for r in range(3)]
    assert {r.batches_per_pass(0) for r in ranks} == {2}  # 10 rows each, batch 4
    used = [set(stream_digests(r, 0)) for r in ranks]
    assert all(len(u) == 8 for u in used)
    assert not (used[0] & used[1] or used[0] & used[2] or used[1] & used[2])


def test_resume_yields_the_following_batches_without_decoding_skipped_images(tmp_path, monkeypatch):
    files = write_shards(tmp_path, [6, 5, 7])  # 18 rows: 4 batches per pass
    uninterrupted = loader(files)
    reference = take(uninterrupted, 7)
    assert uninterrupted.position == DataPosition(1, 3)

    first = loader(files)
    take(first, 3)
    assert first.position == DataPosition(0, 3)

    decoded = Counter()

    def counting_load_rgb(image: bytes) -> Image.Image:
        decoded[hashlib.sha256(image).hexdigest()] += 1
        return load_rgb(image)

    monkeypatch.setattr(data, "load_rgb", counting_load_rgb)
    resumed = loader(files, position=first.position)
    rest = take(resumed, 4)
    assert same_batches(rest, reference[3:])
    assert sum(decoded.values()) == 4 * 4, "only the yielded batches' images are decoded"
    assert resumed.position == DataPosition(1, 3)
    # A position at a pass's end is the next pass's start.
    assert loader(files, position=DataPosition(0, 4)).position == DataPosition(1, 0)

    monkeypatch.undo()
    with_workers = take(loader(files, position=DataPosition(0, 3), num_workers=2), 4)
    assert same_batches(with_workers, reference[3:])


def test_passes_reshuffle(tmp_path):
    files = write_shards(tmp_path, [8, 8, 8])
    train_loader = loader(files)
    orders = [stream_digests(train_loader, p) for p in range(3)]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])
    assert orders[0] != orders[1] and orders[1] != orders[2]
    batches = take(train_loader, 12)
    assert not torch.equal(batches[0].global_crops, batches[6].global_crops)
    assert same_batches(batches, take(loader(files), 12)), "the reshuffle is seeded"
    other_seed = take(loader(files, seed=8), 1)
    assert not torch.equal(other_seed[0].global_crops, batches[0].global_crops)


def test_bad_images_are_skipped_and_counted(tmp_path):
    images: list[bytes | None] = [jpeg(64, 48, seed=i) for i in range(8)]
    images[1] = truncated_jpeg(1)
    images[4] = b"not an image at all"
    images[6] = None
    path = tmp_path / "part-0.parquet"
    table = curated_table(images, "bad")
    # A null image struct, not only null bytes.
    structs = table.column("image").combine_chunks()
    null_struct = pa.StructArray.from_arrays(
        [structs.field("bytes"), structs.field("path")],
        names=["bytes", "path"],
        mask=pa.array([i == 7 for i in range(8)]),
    )
    table = table.set_column(0, pa.field("image", CURATED.field("image").type), null_struct)
    write_shard(table, path)

    train_loader = loader([path], batch_size=4)
    batches = take(train_loader, 2)  # one whole pass: all 8 rows
    assert sum(b.bad_images for b in batches) == 4 == train_loader.bad_images
    for batch in batches:
        assert batch.global_crops.shape == (8, 3, 32, 32)
        assert torch.isfinite(batch.global_crops).all()

    # Batches of one: a bad row has no good neighbour and borrows the stream's next image.
    singles = loader([path], batch_size=1)
    take(singles, 8)
    assert singles.bad_images == 4

    hopeless = tmp_path / "hopeless.parquet"
    write_shard(curated_table([b"junk", None, b"\xff\xd8"], "junk"), hopeless)
    with pytest.raises(ShardsError, match="no decodable image"):
        take(loader([hopeless], batch_size=1), 1)


def test_unusable_shards_and_sizes_raise(tmp_path):
    files = write_shards(tmp_path, [3])
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(ShardsError, match="notes.parquet.*not a readable Parquet"):
        loader([files[0], not_parquet])
    no_image = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"image_id": ["a"]}), no_image)
    with pytest.raises(ShardsError, match="ids.parquet.*no `image` column"):
        loader([no_image])
    with pytest.raises(ShardsError, match="too few"):
        loader(files, batch_size=4)
    with pytest.raises(ShardsError, match="too few"):
        loader(files, batch_size=2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        loader(files, rank=2, world_size=2)


# -- finding shards -----------------------------------------------------------------------


def test_resolve_shards_folder_glob_file_and_job(tmp_path, settings):
    folder = tmp_path / "curated"
    files = write_shards(folder, [2, 2, 2])
    (folder / ".part-000009.parquet.abc.tmp").write_bytes(b"partial")
    (folder / "README.txt").write_text("not a shard")
    assert resolve_shards(str(folder)) == files
    assert resolve_shards(str(folder / "part-00000[12].parquet")) == files[1:]
    assert resolve_shards(str(files[0])) == [files[0]]

    catalog = Catalog(settings.catalog_file, settings.data_root)
    catalog.open_job(parse_job_spec({"source": "somewhere", "job_id": "j1"}))
    catalog.start_stage("j1", "curated", 2)
    job_files = write_shards(settings.job_dir("j1") / "curated", [3, 2], seed=50)
    for part, path in enumerate(job_files):
        info = write_shard(pq.read_table(path), path)
        catalog.commit_part("j1", "curated", PartResult(part, info.rows, info.rows, {"data": info}))
    assert resolve_shards("j1", settings) == job_files

    with pytest.raises(ShardsError, match="no-such-job"):
        resolve_shards("no-such-job", settings)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardsError, match="empty: folder holds no .parquet"):
        resolve_shards(str(empty))
    with pytest.raises(ShardsError, match="glob matches no files"):
        resolve_shards(str(tmp_path / "nothing-*.parquet"))
    elsewhere = settings.model_copy(update={"data_root": tmp_path / "none"})
    with pytest.raises(ShardsError, match="no catalog"):
        resolve_shards("j1", elsewhere)
    assert not (tmp_path / "none").exists(), "looking a job up creates no catalog"
    job_files[1].unlink()
    with pytest.raises(ShardsError, match="missing"):
        resolve_shards("j1", settings)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 nonsense")
    with pytest.raises(ShardsError, match="bad.parquet"):
        resolve_shards(str(bad))
