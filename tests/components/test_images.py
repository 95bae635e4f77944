import io

import numpy as np
import pytest
from PIL import Image

from components.images import ImageDecodeError, decode_to_array, discover, split_of


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
