import io

import numpy as np
import pytest
from PIL import Image

from curate.stages.ingest.decode import Rejected, decode_image, load_rgb
from schemas.job import IngestOptions
from schemas.reasons import Reason
from tests.images import encode, jpeg, photo, truncated_jpeg

OPTIONS = IngestOptions()


def reason_of(data: bytes, options: IngestOptions = OPTIONS) -> Reason:
    with pytest.raises(Rejected) as caught:
        decode_image(data, options)
    return caught.value.reason


def mode_sample(mode: str) -> bytes:
    base = photo(120, 100, seed=3)
    if mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        return encode(img, "PNG", transparency=0)
    if mode == "LA":
        return encode(base.convert("LA"), "PNG")
    if mode == "RGBA":
        rgba = base.convert("RGBA")
        rgba.putalpha(128)
        return encode(rgba, "PNG")
    if mode == "CMYK":
        return encode(base.convert("CMYK"), "JPEG")
    if mode == "I;16":
        ramp = (np.arange(100 * 120, dtype=np.uint16).reshape(100, 120) * 5) % 65535
        return encode(Image.fromarray(ramp), "PNG")
    if mode == "1":
        return encode(base.convert("1"), "PNG")
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_is_accepted_and_normalised_to_rgb(mode):
    data = mode_sample(mode)
    accepted = decode_image(data, OPTIONS)
    assert accepted.mode == mode
    assert accepted.data == data, "original bytes are kept when no downscale is asked for"
    rgb = load_rgb(accepted.data)
    assert rgb.mode == "RGB" and rgb.size == (120, 100)
    pixels = np.asarray(rgb)
    assert pixels.std() > 5, f"{mode} normalised to a flat image"


def test_sixteen_bit_gray_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 100 * 120).reshape(100, 120).astype(np.uint16)
    rgb = np.asarray(load_rgb(encode(Image.fromarray(ramp), "PNG")))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 100 < rgb[50, 60, 0] < 155, "mid-gray stays mid-gray"


def test_exif_orientation_swaps_reported_size_and_pixels():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo(200, 100, seed=1), "JPEG", exif=exif.tobytes())
    accepted = decode_image(data, OPTIONS)
    assert (accepted.width, accepted.height) == (100, 200)
    assert load_rgb(data).size == (100, 200)


def test_animated_image_takes_the_first_frame():
    frames = [Image.new("RGB", (80, 80), color) for color in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    accepted = decode_image(out.getvalue(), OPTIONS)
    assert accepted.format == "GIF"
    r, g, b = np.asarray(load_rgb(out.getvalue())).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 50 and b < 50


def test_rejections_carry_their_reason():
    assert reason_of(b"") == Reason.EMPTY
    assert reason_of(b"<html><body>hello</body></html>") == Reason.NOT_AN_IMAGE
    assert reason_of(np.random.default_rng(0).bytes(4000)) == Reason.NOT_AN_IMAGE
    assert reason_of(truncated_jpeg()) == Reason.DECODE_ERROR
    assert reason_of(jpeg(40, 40)) == Reason.TOO_SMALL
    assert reason_of(jpeg(500, 100)) == Reason.BAD_ASPECT


def test_decompression_bomb_is_refused_from_the_header():
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(bomb) < 100_000
    assert reason_of(bomb) == Reason.DECOMPRESSION_BOMB
    small_cap = IngestOptions(max_pixels=100 * 100)
    assert reason_of(jpeg(160, 120), small_cap) == Reason.DECOMPRESSION_BOMB


def test_max_side_downscales_and_hashes_the_stored_bytes():
    import hashlib

    data = jpeg(800, 400, seed=2)
    accepted = decode_image(data, IngestOptions(max_side=200))
    assert accepted.resized and accepted.format == "JPEG"
    assert (accepted.width, accepted.height) == (200, 100)
    assert accepted.data != data
    assert accepted.image_id == hashlib.sha256(accepted.data).hexdigest()
    kept = decode_image(data, IngestOptions(max_side=1000))
    assert not kept.resized and kept.data == data
    assert kept.image_id == hashlib.sha256(data).hexdigest()
