"""The demo corpus: deterministic, fully described by its manifest, and planted as promised."""

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, UnidentifiedImageError

from curate.demo import (
    CLASSES,
    MANIFEST_NAME,
    MIN_SEEDS,
    SEED_CLASSES,
    DemoManifest,
    FileKind,
    generate_demo,
    load_manifest,
    planted_counts,
)

COUNT = 120
SEED = 7
PILLOW_PIXEL_LIMIT = 89_478_485
EXIF_ORIENTATION = 0x0112


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, DemoManifest]:
    root = tmp_path_factory.mktemp("demo")
    return root, generate_demo(root, count=COUNT, seed=SEED)


@pytest.fixture(scope="module")
def root(corpus) -> Path:
    return corpus[0]


@pytest.fixture(scope="module")
def manifest(corpus) -> DemoManifest:
    return corpus[1]


def read(root: Path, path: str) -> bytes:
    return (root / path).read_bytes()


def fully_decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_same_parameters_give_byte_identical_files(root, tmp_path):
    again = tmp_path / "again"
    generate_demo(again, count=COUNT, seed=SEED)
    assert digests(again) == digests(root)


def test_another_seed_gives_other_images(root, manifest, tmp_path):
    other = generate_demo(tmp_path / "other", count=COUNT, seed=SEED + 1)
    originals = {f.sha256 for f in manifest.by_kind(FileKind.ORIGINAL)}
    assert not originals & {f.sha256 for f in other.by_kind(FileKind.ORIGINAL)}


def test_manifest_lists_every_file_and_nothing_else(root, manifest):
    on_disk = digests(root)
    assert on_disk.pop(MANIFEST_NAME)
    assert {f.path: f.sha256 for f in manifest.files} == on_disk
    assert len(manifest.files) == len(on_disk)  # no path listed twice


def test_manifest_round_trips(root, manifest):
    assert load_manifest(root) == manifest
    assert (manifest.count, manifest.seed) == (COUNT, SEED)


def test_counts_of_each_kind(manifest):
    counts = planted_counts(COUNT)
    for kind in FileKind:
        assert len(manifest.by_kind(kind)) == counts[kind] > 0, kind
    crawl = manifest.crawl_files
    assert len(crawl) == COUNT
    assert all(f.path.startswith("crawl/") for f in crawl)
    assert len({f.path.split("/")[1] for f in crawl}) >= 1
    assert len(manifest.seed_files) >= MIN_SEEDS


def test_originals_are_labelled_distinct_and_usable(root, manifest):
    originals = manifest.by_kind(FileKind.ORIGINAL)
    assert {f.label for f in originals} == set(CLASSES)
    assert len({f.sha256 for f in originals}) == len(originals)
    for f in originals:
        img = fully_decoded(read(root, f.path))
        assert img.format in ("JPEG", "PNG", "WEBP")
        short, long = sorted(img.size)
        assert short >= 96 and long <= 2.5 * short + 1


def thumbnail(data: bytes) -> np.ndarray:
    """16x16 grey, normalised: blind to size, format and brightness/contrast changes."""
    img = Image.open(io.BytesIO(data)).convert("L").resize((16, 16), Image.Resampling.BOX)
    values = np.asarray(img, dtype=np.float32).ravel()
    return (values - values.mean()) / (values.std() + 1e-6)


def window_error(crop: Image.Image, source: Image.Image) -> float:
    """Smallest mean grey difference between `crop` and an equal window anywhere in `source`."""
    c = np.asarray(crop.convert("L"), dtype=np.float32)
    s = np.asarray(source.convert("L"), dtype=np.float32)
    ys = np.linspace(0, c.shape[0] - 1, 24).astype(int)
    xs = np.linspace(0, c.shape[1] - 1, 24).astype(int)
    patch = c[np.ix_(ys, xs)]
    lefts = np.arange(s.shape[1] - c.shape[1] + 1)
    best = np.inf
    for top in range(s.shape[0] - c.shape[0] + 1):
        windows = s[ys + top][:, xs[None, :] + lefts[:, None]]  # (24, lefts, 24)
        best = min(best, float(np.abs(windows - patch[:, None, :]).mean(axis=(0, 2)).min()))
    return best


def test_near_duplicates_resemble_their_original_and_originals_are_distinct(root, manifest):
    originals = manifest.by_kind(FileKind.ORIGINAL)
    thumbs = np.stack([thumbnail(read(root, f.path)) for f in originals])
    distance = np.abs(thumbs[:, None, :] - thumbs[None, :, :]).mean(axis=2)
    np.fill_diagonal(distance, np.inf)
    closest_pair = float(distance.min())
    assert closest_pair > 0.08  # no two originals are near duplicates by accident
    index = {f.path: i for i, f in enumerate(originals)}
    for f in manifest.by_kind(FileKind.NEAR_DUPLICATE):
        data, source = read(root, f.path), read(root, f.duplicate_of)
        if f.edit.startswith("crop_"):
            # A crop shifts periodic textures out of step with a thumbnail grid: find it instead.
            assert window_error(fully_decoded(data), fully_decoded(source)) < 6, f.edit
            continue
        to_all = np.abs(thumbs - thumbnail(data)).mean(axis=1)
        assert int(to_all.argmin()) == index[f.duplicate_of], f.edit


def test_exact_duplicates_are_byte_identical_copies(root, manifest):
    duplicates = manifest.by_kind(FileKind.EXACT_DUPLICATE)
    for f in duplicates:
        original = manifest.file(f.duplicate_of)
        assert original.kind == FileKind.ORIGINAL and f.path != original.path
        assert read(root, f.path) == read(root, original.path)
        assert f.label == original.label


EDIT_PATTERN = re.compile(
    r"jpeg_q(?P<q>\d+)|format_(png|webp|jpeg)|resize_(?P<scale>0\.\d\d)|crop_(?P<crop>0\.\d\d)"
    r"|(brightness|contrast)_(?P<factor>[01]\.\d\d)"
)


def test_near_duplicates_differ_decode_and_are_edited_as_stated(root, manifest):
    near = manifest.by_kind(FileKind.NEAR_DUPLICATE)
    edit_kinds = {f.edit.split("_")[0] for f in near}
    assert edit_kinds == {"jpeg", "format", "resize", "crop", "brightness", "contrast"}
    for f in near:
        original = manifest.file(f.duplicate_of)
        assert original.kind == FileKind.ORIGINAL and f.label == original.label
        data, source = read(root, f.path), read(root, original.path)
        assert data != source
        img, source_img = fully_decoded(data), fully_decoded(source)
        assert min(img.size) >= 64
        match = EDIT_PATTERN.fullmatch(f.edit)
        assert match, f.edit
        if match["q"]:
            assert img.format == "JPEG" and 40 <= int(match["q"]) <= 70
        elif f.edit.startswith("format_"):
            assert img.format != source_img.format and img.size == source_img.size
        elif match["scale"]:
            scale = float(match["scale"])
            assert 0.5 <= scale <= 0.8
            assert img.size == tuple(round(side * scale) for side in source_img.size)
        elif match["crop"]:
            cut = 1 - img.size[0] / source_img.size[0]
            assert 0.05 <= cut <= 0.21 and img.size[1] < source_img.size[1]
        else:
            assert 0.15 - 1e-9 <= abs(float(match["factor"]) - 1) <= 0.3 + 1e-9
            assert img.size == source_img.size


def test_broken_files_fail_as_their_reason_says(root, manifest):
    expected = manifest.expected_errors()
    assert set(expected.values()) == {
        "decode_error",
        "not_an_image",
        "empty",
        "too_small",
        "bad_aspect",
        "decompression_bomb",
    }
    assert set(expected) == {f.path for f in manifest.by_kind(FileKind.BROKEN)}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for path, reason in expected.items():
        data = read(root, path)
        if reason == "empty":
            assert data == b""
        elif reason == "not_an_image":
            with pytest.raises(UnidentifiedImageError):
                Image.open(io.BytesIO(data))
        elif reason == "decode_error":
            with Image.open(io.BytesIO(data)) as img:  # the header is intact
                assert img.format == "JPEG"
                with pytest.raises(OSError):
                    img.load()
            with Image.open(io.BytesIO(data)) as img:  # and a reduced-scale decode fails too
                img.draft("RGB", (img.size[0] // 8, img.size[1] // 8))
                with pytest.raises(OSError):
                    img.load()
        elif reason == "too_small":
            assert min(fully_decoded(data).size) < 64
        elif reason == "bad_aspect":
            w, h = fully_decoded(data).size
            assert min(w, h) >= 64 and max(w, h) > 4 * min(w, h)
        elif reason == "decompression_bomb":
            assert len(data) < 100_000
            limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                with Image.open(io.BytesIO(data)) as img:
                    assert img.size[0] * img.size[1] > PILLOW_PIXEL_LIMIT
            finally:
                Image.MAX_IMAGE_PIXELS = limit
        else:
            raise AssertionError(reason)


def test_mode_samples_have_the_promised_modes(root, manifest):
    samples = {f.variant: f for f in manifest.by_kind(FileKind.MODE_SAMPLE)}
    promised_modes = {
        "palette_transparency": "P",
        "la": "LA",
        "rgba": "RGBA",
        "cmyk": "CMYK",
        "gray16": "I;16",
        "bilevel": "1",
    }
    assert set(samples) == {*promised_modes, "animated", "exif_orientation_6"}
    for variant, f in samples.items():
        img = fully_decoded(read(root, f.path))
        w, h = img.size
        assert min(w, h) >= 64 and max(w, h) <= 4 * min(w, h), variant
        if variant in promised_modes:
            assert img.mode == promised_modes[variant], variant
        if variant == "palette_transparency":
            assert "transparency" in img.info
        if variant == "animated":
            assert img.format == "GIF" and img.is_animated and img.n_frames == 3
        if variant == "exif_orientation_6":
            assert img.format == "JPEG" and img.getexif()[EXIF_ORIENTATION] == 6
            assert (f.width, f.height) == (h, w)  # the manifest gives the upright size


def test_seeds_are_new_images_of_a_few_classes(root, manifest):
    seeds = manifest.seed_files
    crawl_digests = {f.sha256 for f in manifest.crawl_files}
    assert all(f.path.startswith("seeds/demo/") for f in seeds)
    assert len({f.sha256 for f in seeds}) == len(seeds)
    assert not crawl_digests & {f.sha256 for f in seeds}
    assert {f.label for f in seeds} == set(SEED_CLASSES)
    for f in seeds:
        assert min(fully_decoded(read(root, f.path)).size) >= 64


def test_ingest_gives_each_file_its_expected_outcome(root, manifest):
    decode = pytest.importorskip("curate.stages.ingest.decode")
    from schemas.job import IngestOptions

    options = IngestOptions()
    expected = manifest.expected_errors()
    for f in manifest.crawl_files:
        data = read(root, f.path)
        if f.path in expected:
            with pytest.raises(decode.Rejected) as caught:
                decode.decode_image(data, options)
            assert caught.value.reason == expected[f.path], f.path
        else:
            accepted = decode.decode_image(data, options)
            assert accepted.image_id == f.sha256
            assert (accepted.width, accepted.height) == (f.width, f.height)


def test_existing_corpus_is_returned_without_rewriting(root, manifest):
    stamp = (root / MANIFEST_NAME).stat().st_mtime_ns
    assert generate_demo(root, count=COUNT, seed=SEED) == manifest
    assert (root / MANIFEST_NAME).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("count, seed", [(COUNT + 1, SEED), (COUNT, SEED + 1)])
def test_other_parameters_in_the_same_folder_are_refused(root, count, seed):
    with pytest.raises(ValueError, match="pick another folder"):
        generate_demo(root, count=count, seed=seed)


def test_folder_with_a_crawl_but_no_manifest_is_refused(tmp_path):
    (tmp_path / "crawl").mkdir()
    with pytest.raises(ValueError, match="pick another folder"):
        generate_demo(tmp_path, count=COUNT, seed=SEED)


@pytest.mark.parametrize("count, seed", [(10, 0), (COUNT, -1)])
def test_bad_parameters_are_refused(tmp_path, count, seed):
    with pytest.raises(ValueError):
        generate_demo(tmp_path, count=count, seed=seed)


def test_load_manifest_of_an_unfinished_folder_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path)
