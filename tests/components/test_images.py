import io

import numpy as np
import pytest
from PIL import Image

from components.images import discover
from components.splits import split_of
from detector.decode import DEFAULT_LIMITS, DecodeLimits, ImageDecodeError, decode_to_array, open_image


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,size", [("L", (50, 70)), ("RGB", (300, 200)), ("RGBA", (64, 64)),
                                       ("I;16", (40, 40)), ("P", (33, 90))])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_size_and_mode_becomes_the_configured_tensor(mode, size, channels):
    array = (np.random.default_rng(0).random(size[::-1]) * 200).astype(np.uint16 if mode == "I;16" else np.uint8)
    image = Image.fromarray(array)  # uint16 -> I;16, uint8 -> L
    if mode not in ("L", "I;16"):
        image = image.convert(mode)
    out = decode_to_array(_png(image), 32, channels)
    assert out.shape == (channels, 32, 32) and out.dtype == np.uint8
    assert out.std() > 0


def test_jpeg_decodes_too():
    out = decode_to_array(_png(Image.new("RGB", (80, 80), (200, 10, 10)), "JPEG"), 16, 3)
    assert out.shape == (3, 16, 16) and out[0].mean() > out[1].mean()


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is not an image", "not an image"),
])
def test_unusable_bytes_raise_a_named_error(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_to_array(data, 32, 3)


def test_truncated_png_is_refused():
    data = _png(Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_to_array(data[: len(data) // 2], 32, 3)


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixel data at all."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) \
        + chunk(b"IEND", b"")


def test_pixel_limit_is_read_from_the_header_before_any_decoding():
    # 9000x9000 = 81 Mpx: under Pillow's own bomb limit, over the default max_pixels. The file has
    # no pixel data, so only a check made before decoding can say "too large" instead of "truncated".
    with pytest.raises(ImageDecodeError, match=r"9000x9000 = 81000000 pixels, over the limit max_pixels=50000000"):
        open_image(_header_only_png(9000, 9000))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        open_image(_header_only_png(90, 90))


def test_configured_limits_refuse_by_pixels_and_by_bytes_and_allow_up_to_the_limit():
    data = _png(Image.fromarray((np.random.default_rng(2).random((20, 30)) * 255).astype(np.uint8)))
    assert open_image(data, DecodeLimits(max_pixels=600, max_bytes=len(data))).size == (30, 20)
    with pytest.raises(ImageDecodeError, match=r"30x20 = 600 pixels, over the limit max_pixels=599"):
        open_image(data, DecodeLimits(max_pixels=599))
    with pytest.raises(ImageDecodeError, match=rf"{len(data)} bytes, over the limit max_bytes={len(data) - 1}"):
        decode_to_array(data, 16, 1, DecodeLimits(max_bytes=len(data) - 1))
    with pytest.raises(ValueError):
        DecodeLimits(max_pixels=0)


def test_safe_default_limits_match_params_and_truncated_images_stay_refused():
    from PIL import ImageFile

    from pipeline.config import Preprocess

    assert DEFAULT_LIMITS == DecodeLimits(50_000_000, 50 * 1024 * 1024)
    assert (Preprocess().max_pixels, Preprocess().max_bytes) == (DEFAULT_LIMITS.max_pixels, DEFAULT_LIMITS.max_bytes)
    assert DecodeLimits.from_dict(None) == DEFAULT_LIMITS  # a model spec without limits gets the defaults
    assert DecodeLimits.from_dict({"max_pixels": 10, "max_bytes": 20}) == DecodeLimits(10, 20)
    data = _png(Image.fromarray((np.random.default_rng(3).random((64, 64)) * 255).astype(np.uint8)))
    with pytest.raises(ImageDecodeError):
        open_image(data[:-200])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_discover_reads_plain_single_batch_and_mvtec_layouts(tmp_path):
    def touch(rel):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    for rel in ("land/b1/good/a.png", "land/b1/scratch/b.png", "land/b2/good/c.JPG", "land/b2/good/notes.txt",
                "single/good/a.png", "single/spot/b.jpeg",
                "mvtec/bottle/train/good/000.png", "mvtec/bottle/test/good/001.png",
                "mvtec/bottle/test/broken_large/002.png", "mvtec/bottle/ground_truth/broken_large/002_mask.png"):
        touch(rel)
    plain = discover(tmp_path / "land")
    assert [(f.batch, f.label, f.relpath) for f in plain] == [
        ("b1", "good", "b1/good/a.png"), ("b1", "scratch", "b1/scratch/b.png"), ("b2", "good", "b2/good/c.JPG")]
    assert len(discover(tmp_path / "land", include_all_files=True)) == 4
    assert {(f.batch, f.label) for f in discover(tmp_path / "single")} == {("single", "good"), ("single", "spot")}
    mvtec = discover(tmp_path / "mvtec")
    assert sorted((f.label, f.relpath) for f in mvtec) == [
        ("broken_large", "bottle/test/broken_large/002.png"), ("good", "bottle/test/good/001.png"),
        ("good", "bottle/train/good/000.png")]


def test_split_is_a_stable_function_of_content():
    import hashlib

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(200)]
    first = [split_of(d, (0.6, 0.2, 0.2)) for d in digests]
    assert first == [split_of(d, (0.6, 0.2, 0.2)) for d in digests]
    assert set(first) == {"train", "calibration", "test"}


def test_discover_follows_links_only_inside_its_folder(tmp_path):
    """Issue 19 (2): a link in the snapshot is read only when it stays inside it; one that leaves
    it (file or folder) or dangles is named, never read from wherever it points."""
    import os

    good = tmp_path / "raw" / "b1" / "good"
    good.mkdir(parents=True)
    (good / "a.png").write_bytes(b"x")
    os.symlink("a.png", good / "alias.png")                  # inside: listed
    assert [f.relpath for f in discover(tmp_path / "raw")] == ["b1/good/a.png", "b1/good/alias.png"]
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.png").write_bytes(b"private")
    os.symlink(tmp_path / "secret" / "key.png", good / "key.png")
    with pytest.raises(ValueError, match=r"b1/good/key\.png -> .*secret/key\.png: a link that leaves"):
        discover(tmp_path / "raw")
    (good / "key.png").unlink()
    os.symlink(tmp_path / "secret", tmp_path / "raw" / "b1" / "spot")   # a label folder out
    with pytest.raises(ValueError, match=r"b1/spot -> .*secret: a link that leaves"):
        discover(tmp_path / "raw")
    (tmp_path / "raw" / "b1" / "spot").unlink()
    os.symlink(tmp_path / "gone.png", good / "gone.png")
    with pytest.raises(ValueError, match=r"b1/good/gone\.png -> .*gone\.png: a dangling link"):
        discover(tmp_path / "raw", include_all_files=True)


def _encoded(fmt: str) -> bytes:
    """A real file of that format, as Pillow writes it (EPS: PostScript, which Pillow would hand
    to Ghostscript to decode)."""
    noise = (np.random.default_rng(4).random((24, 24, 3)) * 255).astype(np.uint8)
    return _png(Image.fromarray(noise), fmt)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP", "WEBP", "EPS"])
def test_only_the_allowed_formats_are_decoded(fmt, monkeypatch):
    """Issue 19 (6): a format outside validate.allowed_formats is refused by name, and Pillow's
    decoder for it is never called (its plugin's opener is replaced by one that fails the test)."""
    data = _encoded(fmt)
    Image.init()

    def must_not_run(*args, **kwargs):
        raise AssertionError(f"the {fmt} decoder ran")

    monkeypatch.setitem(Image.OPEN, fmt, (must_not_run, Image.OPEN[fmt][1]))
    message = rf"{fmt} is not an allowed format \(validate.allowed_formats: PNG, JPEG\); not decoded"
    with pytest.raises(ImageDecodeError, match=message):
        open_image(data)
    with pytest.raises(ImageDecodeError, match=message):
        decode_to_array(data, 16, 3)  # preprocess's and the served model's path
    with pytest.raises(ImageDecodeError, match=r"BMP is not an allowed format \(validate.allowed_formats: PNG\)"):
        open_image(_encoded("BMP"), DecodeLimits(formats=("PNG",)))


def test_a_format_decodes_once_it_is_allowed():
    for fmt in ("GIF", "TIFF", "BMP"):
        image = open_image(_encoded(fmt), DecodeLimits(formats=("PNG", "JPEG", fmt)))
        assert image.format == fmt and image.size == (24, 24)
    assert decode_to_array(_encoded("JPEG"), 16, 3).shape == (3, 16, 16)
    with pytest.raises(ImageDecodeError, match="not an image Pillow can identify"):
        open_image(b"plain text, no image format at all")


def test_decode_limits_carry_the_allowed_formats_and_an_old_spec_gets_png_and_jpeg():
    """The served model's spec.json carries them in decode_limits; a model registered before
    they existed (no 'formats' there) decodes PNG and JPEG only."""
    assert DEFAULT_LIMITS.formats == ("PNG", "JPEG")
    assert DecodeLimits.from_dict({"max_pixels": 10, "max_bytes": 20}).formats == ("PNG", "JPEG")
    limits = DecodeLimits(10, 20, formats=("png", "gif"))
    assert limits.formats == ("PNG", "GIF")
    assert limits.as_dict() == {"max_pixels": 10, "max_bytes": 20, "formats": ["PNG", "GIF"]}
    assert DecodeLimits.from_dict(limits.as_dict()) == limits
    with pytest.raises(ValueError, match="'JPG'"):
        DecodeLimits(formats=("PNG", "JPG"))  # Pillow calls it JPEG
    with pytest.raises(ValueError, match="at least one format"):
        DecodeLimits(formats=())
