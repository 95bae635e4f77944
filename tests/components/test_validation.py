"""Each kind of bad batch fails the Great Expectations suite, and the report names the files."""
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from components.images import discover
from detector.decode import DecodeLimits
from components.validation import Rules, build_manifest, render_html, validate_manifest

RULES = Rules(min_good=10, min_anomalies=5, anomaly_ratio=(0.05, 0.6))
FRACTIONS = (0.6, 0.2, 0.2)


def _validate(landing, rules=RULES, limits=DecodeLimits()):
    files = discover(landing, rules.extensions, include_all_files=True)
    return validate_manifest(build_manifest(files, FRACTIONS, limits), rules)


def _offending(report) -> str:
    return "\n".join(f["description"] + "\n" + "\n".join(f["offending_files"]) for f in report.failures)


def test_a_clean_batch_passes_and_renders(tiny_landing):
    report = _validate(tiny_landing)
    assert report.success, report.describe()
    assert report.label_counts["good"] == 40
    html = render_html(report)
    assert "validation passed" in html and "could not render" not in html
    assert "decode_ok" in html and "labels_per_hash" in html  # GX's own page lists every expectation


@pytest.mark.parametrize("name,content,reason", [
    ("zero.png", b"", "empty file"),
    ("text.png", b"hello, I am not a picture", "not an image"),
    ("truncated.png", "truncate", "corrupt or truncated"),
])
def test_broken_files_fail_and_are_named(landing_copy, name, content, reason):
    target = landing_copy / "batch-0001" / "good" / name
    if content == "truncate":
        source = next((landing_copy / "batch-0001" / "good").glob("*.png")).read_bytes()
        content = source[: len(source) // 3]
    target.write_bytes(content)
    report = _validate(landing_copy)
    assert not report.success
    text = _offending(report)
    assert f"batch-0001/good/{name}: " in text and reason in text


def test_non_image_extension_and_lying_extension_fail(landing_copy):
    (landing_copy / "batch-0001" / "good" / "readme.txt").write_text("notes")
    png = next((landing_copy / "batch-0001" / "spot").glob("*.png"))
    shutil.copy(png, landing_copy / "batch-0001" / "spot" / "actually_png.jpg")
    report = _validate(landing_copy)
    failed = {f["column"]: f for f in report.failures}
    assert "batch-0001/good/readme.txt" in "\n".join(failed["ext"]["offending_files"])
    assert "batch-0001/spot/actually_png.jpg" in "\n".join(failed["format_matches_extension"]["offending_files"])


def test_unexpected_mode_and_size_fail(landing_copy):
    odd = Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).convert("CMYK")
    odd.save(landing_copy / "batch-0001" / "good" / "cmyk.jpg", format="JPEG")
    report = _validate(landing_copy)
    failed = {f["column"]: f for f in report.failures}
    assert "batch-0001/good/cmyk.jpg" in "\n".join(failed["mode"]["offending_files"])
    assert "batch-0001/good/cmyk.jpg" in "\n".join(failed["geometry_is_majority"]["offending_files"])


def test_one_class_only_fails_on_anomaly_count_and_ratio(landing_copy):
    for folder in (landing_copy / "batch-0001").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    report = _validate(landing_copy)
    columns = {f["column"] for f in report.failures}
    assert {"is_anomaly"} <= columns
    assert "labelled anomalies" in report.describe()


def test_empty_batch_fails(tmp_path):
    (tmp_path / "batch-0001" / "good").mkdir(parents=True)
    report = _validate(tmp_path)
    assert not report.success and report.n_files == 0
    assert "no files found" in report.describe()


def test_same_image_under_two_labels_fails(landing_copy):
    png = next((landing_copy / "batch-0001" / "good").glob("*.png"))
    shutil.copy(png, landing_copy / "batch-0001" / "scratch" / "copy_of_good.png")
    report = _validate(landing_copy)
    failed = {f["column"]: f for f in report.failures}
    files = "\n".join(failed["labels_per_hash"]["offending_files"])
    assert "batch-0001/scratch/copy_of_good.png" in files and png.name in files


def test_flat_frame_fails(landing_copy):
    Image.new("RGB", (64, 64), (90, 90, 90)).save(landing_copy / "batch-0001" / "good" / "lens_cap.png")
    report = _validate(landing_copy)
    failed = {f["column"]: f for f in report.failures}
    assert "batch-0001/good/lens_cap.png" in "\n".join(failed["std"]["offending_files"])


def test_decompression_bomb_is_refused(landing_copy, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 2x the limit
    report = _validate(landing_copy)
    assert not report.success
    assert "decompression bomb" in _offending(report)


def test_decoding_limits_name_the_oversized_files(landing_copy):
    good = landing_copy / "batch-0001" / "good"
    source = sorted(good.glob("*.png"))[0].read_bytes()
    noise = (np.random.default_rng(5).random((200, 150, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(good / "wide.png")            # 30000 pixels, over max_pixels
    (good / "padded.png").write_bytes(source + b"\0" * 300_000)  # over max_bytes
    report = _validate(landing_copy, limits=DecodeLimits(max_pixels=64 * 64, max_bytes=200_000))
    decode = {f["column"]: f for f in report.failures}["decode_ok"]["offending_files"]
    assert any(line.startswith("batch-0001/good/wide.png: image too large: 150x200 = 30000 pixels, over the "
                               "limit max_pixels=4096") for line in decode), decode
    assert any(line.startswith("batch-0001/good/padded.png: file too large:") and "max_bytes=200000" in line
               for line in decode), decode
    assert len(decode) == 2  # the 64x64 images of the batch are exactly at the pixel limit, and pass


def test_a_batch_without_good_fails_even_when_earlier_batches_have_normal_images(landing_copy):
    night = landing_copy / "batch-0002"
    shutil.copytree(landing_copy / "batch-0001" / "scratch", night / "scratch")
    report = _validate(landing_copy)
    failed = {f["column"]: f for f in report.failures}
    assert set(failed) == {"batch_has_normal"}  # the totals (good count, anomaly ratio) still pass
    files = failed["batch_has_normal"]["offending_files"]
    assert files and all(line.startswith("batch-0002/scratch/") for line in files)
    assert "every batch has normal images (a good/ folder)" in report.describe()
