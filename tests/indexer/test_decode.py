"""Decoding never raises: every bad file becomes a typed skip reason; good files come out RGB, bounded."""
import hashlib
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from segsearch.testing.images import png_claiming
from segsearch.indexer.decode import (
    DecodeConfig,
    DecodedImage,
    ImageSkipped,
    SkippedImage,
    SkipReason,
    decode_bytes,
    decode_file,
)


def encode(array, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_claiming(width, height):
    return png_claiming(width, height, colour=2)  # RGB


def gradient(height, width):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     (x + y) % 256], axis=-1).astype(np.uint8)


def test_png_roundtrip_rgb_uint8_and_sha256(tmp_path):
    array = gradient(30, 40)
    path = tmp_path / "a.png"
    path.write_bytes(encode(array))
    decoded = decode_file(path, DecodeConfig())
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (30, 40, 3)
    np.testing.assert_array_equal(decoded.pixels, array)
    assert decoded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert decoded.original_size == (40, 30)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_longest_side_bounded_aspect_kept(fmt):
    array = gradient(300, 600)
    decoded = decode_bytes(encode(array, fmt), DecodeConfig(max_side=64))
    assert decoded.pixels.shape == (32, 64, 3)
    assert decoded.original_size == (600, 300)
    # JPEG takes the draft (reduced-scale) path: the result still looks like the image.
    reference = np.asarray(Image.fromarray(array).resize((64, 32), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(decoded.pixels.astype(np.float32) - reference).mean() < 12


def test_small_images_are_not_enlarged():
    assert decode_bytes(encode(gradient(10, 12)), DecodeConfig(max_side=512)).pixels.shape == (10, 12, 3)


def test_exif_orientation_is_applied():
    array = gradient(20, 40)  # wide; EXIF 6 = rotate 90 degrees clockwise for display
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_bytes(encode(array, "JPEG", exif=exif, quality=95), DecodeConfig())
    assert decoded.pixels.shape == (40, 20, 3) and decoded.original_size == (20, 40)
    expected = np.rot90(array, k=-1)  # clockwise
    assert np.abs(decoded.pixels.astype(int) - expected.astype(int)).mean() < 8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "1"])
def test_every_mode_becomes_rgb_uint8(mode):
    base = Image.fromarray(gradient(16, 16))
    if mode == "I;16":
        image = Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257))
    else:
        image = base.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "TIFF" if mode == "CMYK" else "PNG")
    decoded = decode_bytes(buffer.getvalue(), DecodeConfig())
    assert decoded.pixels.shape == (16, 16, 3) and decoded.pixels.dtype == np.uint8
    if mode == "I;16":  # full 16-bit range maps onto the full 8-bit range
        assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    assert (decode_bytes(encode(rgba), DecodeConfig()).pixels == 255).all()


def test_bad_files_become_typed_skips(tmp_path):
    jpeg = encode(gradient(64, 64), "JPEG")
    cases = {
        "empty.jpg": (b"", SkipReason.EMPTY_FILE),
        "text.png": (b"this is not an image\n", SkipReason.NOT_AN_IMAGE),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], SkipReason.CORRUPT),
        "garbage_body.png": (encode(gradient(8, 8))[:40] + b"\x00" * 50, SkipReason.CORRUPT),
        "bomb.png": (png_header_claiming(30000, 30000), SkipReason.TOO_MANY_PIXELS),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    for name, (_, reason) in cases.items():
        result = decode_file(tmp_path / name, DecodeConfig())
        assert isinstance(result, SkippedImage), name
        assert result.reason is reason, (name, result)
        assert result.detail
    missing = decode_file(tmp_path / "missing.png", DecodeConfig())
    folder = decode_file(tmp_path, DecodeConfig())
    assert missing.reason is SkipReason.UNREADABLE and folder.reason is SkipReason.UNREADABLE


def test_only_the_corpus_formats_are_tried():
    """A GIF (or anything PIL could read through another plugin, such as PostScript) is refused."""
    gif = encode(gradient(8, 8), "GIF")
    with pytest.raises(ImageSkipped) as info:
        decode_bytes(gif, DecodeConfig())
    assert info.value.skipped.reason is SkipReason.NOT_AN_IMAGE
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF"):
        assert decode_bytes(encode(gradient(8, 8), fmt), DecodeConfig()).pixels.shape == (8, 8, 3), fmt


def test_configured_pixel_limit_refuses_before_decoding():
    data = encode(gradient(100, 100))
    assert isinstance(decode_bytes(data, DecodeConfig(max_pixels=10_000)), DecodedImage)
    with pytest.raises(ImageSkipped) as info:
        decode_bytes(data, DecodeConfig(max_pixels=9_999))
    assert info.value.skipped.reason is SkipReason.TOO_MANY_PIXELS
    assert "10000 pixels exceeds the limit of 9999" in info.value.skipped.detail


def _bomb_100mp() -> bytes:
    """10000x10000 1-bit zeros: ~12 kB of PNG, 100 MP (above PIL's own 89 MP warning level)."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 200_000
    return buffer.getvalue()


@pytest.mark.parametrize("limit", [50_000_000, 10_000_000])
def test_a_real_bomb_is_refused_quoting_the_configured_limit_not_pils(limit):
    """Above the limit our header check speaks; far above it PIL's guard (a second line,
    raised to twice the limit for our opens) does, and its warning is an error, not a decode."""
    with pytest.raises(ImageSkipped) as info:
        decode_bytes(_bomb_100mp(), DecodeConfig(max_pixels=limit))
    assert info.value.skipped.reason is SkipReason.TOO_MANY_PIXELS
    assert f"the limit of {limit}" in info.value.skipped.detail and "89478485" not in info.value.skipped.detail
    assert Image.MAX_IMAGE_PIXELS == 89478485 or Image.MAX_IMAGE_PIXELS is None  # restored


def test_a_limit_above_pils_own_applies():
    """A 95 MP header under a 100 MP limit passes the pixel checks (PIL alone would refuse it at
    89 MP); it then fails as what it is, a file with no pixel data."""
    with pytest.raises(ImageSkipped) as info:
        decode_bytes(png_header_claiming(10_000, 9_500), DecodeConfig(max_pixels=100_000_000))
    assert info.value.skipped.reason is SkipReason.CORRUPT


SIGNATURES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about corrupt EXIF in random TIFFs
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(SIGNATURES), tail=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_a_skip(prefix, tail):
    try:
        result = decode_bytes(prefix + tail, DecodeConfig(max_pixels=1_000_000, max_side=64))
    except ImageSkipped as exc:
        assert isinstance(exc.skipped.reason, SkipReason)
    else:
        assert result.pixels.ndim == 3 and result.pixels.shape[2] == 3 and max(result.pixels.shape[:2]) <= 64
