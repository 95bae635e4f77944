"""Fault catalogue 1 and 2: bad files and bad batches reach the landing folder.

One champion (v1) is trained once for the module. Each test then lands a bad batch and runs
``python -m pipeline run`` as the nightly job would, and checks that the run stops at validate
with an error and a report that name every bad file or failed expectation, that nothing
downstream ran (the later stages' dvc.lock entries, the processed arrays and the weights are
untouched), that no model version was registered, and that v1 is still the champion.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.synthetic import BatchSpec, write_batch
from pipeline.io import EXIT_DATA_ERROR
from conftest import make_workspace, run_cli

pytestmark = pytest.mark.slow

MODEL = "anomaly-detector"
# decoding limits of this workspace: far above its 64x64 images, low enough for small test bombs
MAX_PIXELS, MAX_BYTES = 1_000_000, 2_000_000
DOWNSTREAM = ("validate", "preprocess", "train", "calibrate", "evaluate")


@dataclass(frozen=True)
class Snapshot:
    """What a refused run must leave exactly as it was."""
    lock: dict            # dvc.lock entries of validate and everything after it
    weights: tuple        # models/model.pt: (sha256, mtime_ns)
    processed: tuple      # data/processed/index.parquet: (sha256, mtime_ns)
    versions: list        # registered versions of the model
    champion: str | None


def _file_state(path: Path) -> tuple:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _client(root: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _snapshot(root: Path) -> Snapshot:
    from mlflow.exceptions import MlflowException

    client = _client(root)
    try:
        champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    except MlflowException:
        champion = None
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return Snapshot(
        lock={stage: lock.get(stage) for stage in DOWNSTREAM},
        weights=_file_state(root / "models" / "model.pt"),
        processed=_file_state(root / "data" / "processed" / "index.parquet"),
        versions=sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")),
        champion=champion,
    )


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> tuple[Path, Snapshot]:
    root = make_workspace(tmp_path_factory.mktemp("bad-data") / "ws",
                          params={"preprocess": {"max_pixels": MAX_PIXELS, "max_bytes": MAX_BYTES}})
    run_cli(root, "run")
    state = _snapshot(root)
    assert state.versions == ["1"] and state.champion == "1", state
    assert all(state.lock[stage] for stage in DOWNSTREAM)
    return root, state


@pytest.fixture
def landing(champion):
    """The landing folder with the champion's batch-0001; put back exactly so after each test."""
    root, _ = champion
    folder = root / "data" / "landing"
    parked = root / "parked-batch-0001"
    yield folder
    if parked.exists():
        shutil.rmtree(folder / "batch-0001", ignore_errors=True)
        parked.rename(folder / "batch-0001")
    for entry in folder.iterdir():
        if entry.name != "batch-0001":
            shutil.rmtree(entry)


def _only_this_batch(root: Path) -> None:
    """The night's batch is the whole landing folder (batch-0001 parked outside it)."""
    (root / "data" / "landing" / "batch-0001").rename(root / "parked-batch-0001")


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _noise(shape: tuple, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def _run_refused(root: Path, before: Snapshot) -> tuple[str, dict, str]:
    """Run the pipeline; assert it stopped at validate and lost nothing. Returns (output, summary, html)."""
    result = run_cli(root, "run", check=False)
    output = result.stdout + result.stderr
    # refused data: the validate stage and `run` exit EXIT_DATA_ERROR (schedulers must not retry)
    assert result.returncode == EXIT_DATA_ERROR, output[-4000:]
    assert "failed to reproduce 'validate'" in output and f"exited with {EXIT_DATA_ERROR}" in output, output[-4000:]
    assert "the pipeline stopped at validate; nothing was registered or promoted" in output
    for stage in DOWNSTREAM[1:]:
        assert f"Running stage '{stage}'" not in output, f"{stage} ran after a refused validation"
    assert not (root / "data" / "manifest.parquet").exists(), "a refused batch must leave no manifest to preprocess"

    after = _snapshot(root)
    assert after.lock == before.lock, "dvc.lock changed for validate or a stage after it"
    assert after.weights == before.weights, "models/model.pt was rewritten"
    assert after.processed == before.processed, "data/processed was rewritten"
    assert after.versions == before.versions == ["1"], "a model version was registered from refused data"
    assert after.champion == before.champion == "1", "the champion moved"

    client = _client(root)
    newest = client.search_runs([client.get_experiment_by_name(MODEL).experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert newest.info.status == "FAILED" and newest.data.tags.get("failed_stage") == "validate"

    summary = json.loads((root / "reports" / "validation" / "summary.json").read_text())
    html = (root / "reports" / "validation" / "report.html").read_text()
    assert summary["success"] is False and "validation FAILED" in html
    return output, summary, html


def _named(summary: dict, column: str) -> str:
    failures = {f["column"]: f for f in summary["failures"]}
    assert column in failures, f"no failed expectation on {column}: {[f['description'] for f in summary['failures']]}"
    return "\n".join(failures[column]["offending_files"])


def test_unreadable_files_are_refused_by_name(champion, landing):
    """Fault 1: corrupt, truncated, zero-byte, non-image, lying extension, pixel bomb, oversized file."""
    root, before = champion
    source = sorted((landing / "batch-0001" / "good").glob("*.png"))[0].read_bytes()
    good = landing / "batch-0002" / "good"
    shutil.copytree(landing / "batch-0001" / "good", good)  # a normal night's images, plus the bad ones
    damaged = bytearray(source)
    damaged[len(damaged) // 2: len(damaged) // 2 + 64] = bytes(64)  # zeroed bytes inside the image data
    bad = {
        "corrupt.png": bytes(damaged),
        "truncated.png": source[: len(source) // 2],
        "empty.png": b"",
        "notes.txt": b"operator notes, not an image",
        "photo.jpg": _png(Image.fromarray(_noise((64, 64, 3), 1))),          # PNG content, .jpg name
        "bomb.png": _png(Image.new("L", (2000, 1000))),                     # 2 Mpx in a few kB
        "huge.png": source + bytes(MAX_BYTES),                              # over max_bytes
    }
    for name, data in bad.items():
        (good / name).write_bytes(data)

    output, summary, html = _run_refused(root, before)
    reasons = {
        "corrupt.png": "corrupt or truncated image",
        "truncated.png": "corrupt or truncated image",
        "empty.png": "empty file (0 bytes)",
        "notes.txt": "not an image Pillow can identify",
        "bomb.png": f"image too large: 2000x1000 = 2000000 pixels, over the limit max_pixels={MAX_PIXELS}",
        "huge.png": f"file too large: {len(source) + MAX_BYTES} bytes, over the limit max_bytes={MAX_BYTES}",
    }
    decode = _named(summary, "decode_ok")
    for name, reason in reasons.items():
        line = f"batch-0002/good/{name}: {reason}"
        assert line in decode, f"{name} not named with its reason in the report:\n{decode}"
        assert line in output and line in html, f"{name} not named in the run's output or the HTML report"
    assert decode.count("\n") + 1 == len(reasons), "a file that decodes was reported as undecodable"
    assert "batch-0002/good/notes.txt" in _named(summary, "ext")
    assert _named(summary, "format_matches_extension") == "batch-0002/good/photo.jpg"
    assert "every file's content matches its extension" in output


def test_served_champion_applies_the_decoding_limits_it_was_trained_with(champion):
    """Security: the registered pyfunc carries max_pixels/max_bytes and refuses a bomb when it scores."""
    import mlflow

    root, _ = champion
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # process-global, and an earlier test may have set it: say it here
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    import pandas as pd

    normal = sorted((root / "data" / "landing" / "batch-0001" / "good").glob("*.png"))[0].read_bytes()
    scored = model.predict(pd.DataFrame({"image": [normal]}))
    assert scored["anomaly_score"].notna().all()
    # 1500x1000 = 1.5 Mpx: under the safe default (50 Mpx), over this model's max_pixels (1 Mpx)
    with pytest.raises(ValueError, match=rf"row 1: image too large: 1500x1000 = 1500000 pixels, "
                                         rf"over the limit max_pixels={MAX_PIXELS}"):
        model.predict(pd.DataFrame({"image": [normal, _png(Image.new("L", (1500, 1000)))]}))
    with pytest.raises(ValueError, match=rf"row 0: file too large: .* max_bytes={MAX_BYTES}"):
        model.predict(pd.DataFrame({"image": [normal + bytes(MAX_BYTES)]}))


def _missing_good(landing: Path) -> tuple[str, list[str]]:
    night = write_batch(landing, "batch-0002", seed=21, spec=BatchSpec(n_good=5, n_per_defect=5, size=64))
    shutil.rmtree(night / "good")
    return "batch_has_normal", ["every batch has normal images (a good/ folder)", "batch-0002/scratch/"]


def _single_class(landing: Path) -> tuple[str, list[str]]:
    _only_this_batch(landing.parents[1])
    write_batch(landing, "batch-0002", seed=22, spec=BatchSpec(n_good=30, n_per_defect=0, size=64))
    return "is_anomaly", ["at least 5 labelled anomalies (observed 0)", "the anomaly ratio is within [0.02, 0.6] "
                                                                        "(observed 0.0)"]


def _ratio_out_of_bounds(landing: Path) -> tuple[str, list[str]]:
    _only_this_batch(landing.parents[1])
    write_batch(landing, "batch-0002", seed=23, spec=BatchSpec(n_good=10, n_per_defect=10, size=64))
    return "is_anomaly", ["the anomaly ratio is within [0.02, 0.6] (observed 0.8)"]


def _same_image_two_labels(landing: Path) -> tuple[str, list[str]]:
    night = write_batch(landing, "batch-0002", seed=24, spec=BatchSpec(n_good=5, n_per_defect=1, size=64))
    original = sorted((night / "good").glob("*.png"))[0]
    shutil.copy(original, night / "scratch" / "relabelled.png")
    return "labels_per_hash", ["no identical image content appears under two labels",
                               f"batch-0002/good/{original.name}", "batch-0002/scratch/relabelled.png"]


def _other_size_and_mode(landing: Path) -> tuple[str, list[str]]:
    night = write_batch(landing, "batch-0002", seed=25, spec=BatchSpec(n_good=5, n_per_defect=1, size=64))
    Image.fromarray(_noise((96, 96, 3), 2)).save(night / "good" / "other_camera.png")   # 96x96 RGB
    Image.fromarray(_noise((64, 64), 3)).save(night / "good" / "grey.png")              # 64x64 L
    return "geometry_is_majority", ["every image has the same size and mode as the majority",
                                    "batch-0002/good/other_camera.png", "batch-0002/good/grey.png"]


@pytest.mark.parametrize("make_batch", [_missing_good, _single_class, _ratio_out_of_bounds, _same_image_two_labels,
                                        _other_size_and_mode], ids=lambda f: f.__name__.strip("_"))
def test_bad_batches_are_refused_with_an_actionable_report(champion, landing, make_batch):
    """Fault 2: schema and distribution problems of a batch."""
    root, before = champion
    column, expected = make_batch(landing)
    output, summary, html = _run_refused(root, before)
    named = _named(summary, column)
    described = "\n".join(f["description"] for f in summary["failures"])
    for text in expected:
        assert text in named or text in described, f"{text!r} not in the report:\n{described}\n{named}"
        assert text in output and text in html, f"{text!r} not in the run's output or the HTML report"



def _other_format(fmt: str, seed: int) -> bytes:
    """A real image file of another format than PNG and JPEG, as Pillow writes it."""
    return _png(Image.fromarray(_noise((64, 64, 3), seed)), fmt)


OTHER_FORMATS = ("GIF", "TIFF", "BMP", "WEBP")


def test_a_format_validation_does_not_allow_is_refused_by_name_without_decoding(champion, landing):
    """Issue 19 (6): GIF/TIFF/BMP/WEBP content under a .png name is not decoded at all: each file
    is named in the report with its format and validate.allowed_formats."""
    root, before = champion
    good = landing / "batch-0002" / "good"
    shutil.copytree(landing / "batch-0001" / "good", good)
    for index, fmt in enumerate(OTHER_FORMATS):
        (good / f"{fmt.lower()}.png").write_bytes(_other_format(fmt, index))
    output, summary, html = _run_refused(root, before)
    decode = _named(summary, "decode_ok")
    for fmt in OTHER_FORMATS:
        line = (f"batch-0002/good/{fmt.lower()}.png: {fmt} is not an allowed format "
                "(validate.allowed_formats: PNG, JPEG); not decoded")
        assert line in decode, f"{fmt} not named with its reason:\n{decode}"
        assert line in output and line in html, f"{fmt} not named in the run's output or the HTML report"


def test_the_served_champion_decodes_only_the_formats_it_was_trained_with(champion):
    """Issue 19 (6): the registered pyfunc carries validate.allowed_formats in its spec's
    decode_limits, and refuses any other format by name instead of handing it to Pillow."""
    import mlflow
    import pandas as pd

    root, _ = champion
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert model.unwrap_python_model().limits.formats == ("PNG", "JPEG")  # from its spec.json's decode_limits
    normal = sorted((root / "data" / "landing" / "batch-0001" / "good").glob("*.png"))[0].read_bytes()
    jpeg = _png(Image.open(io.BytesIO(normal)).convert("RGB"), "JPEG")
    assert model.predict(pd.DataFrame({"image": [normal, jpeg]}))["anomaly_score"].notna().all()
    for index, fmt in enumerate(OTHER_FORMATS):
        with pytest.raises(ValueError, match=rf"row 1: {fmt} is not an allowed format "
                                             r"\(validate.allowed_formats: PNG, JPEG\); not decoded"):
            model.predict(pd.DataFrame({"image": [normal, _other_format(fmt, index)]}))


def test_the_scoring_dag_refuses_by_the_champions_limits_without_reading_or_jamming(champion):
    """Issue 19 (5), through ``pipeline score-incoming`` (what the scoring DAG runs) with the
    registered champion, whose decode_limits (MAX_PIXELS, MAX_BYTES) are far below the
    defaults: a file over either is refused by name with the champion's limit, a 400 MB file
    by its size on disk, and the good one is still scored (the old pre-check let the first two
    through, the champion refused the whole claim, and it was set aside unscored)."""
    import pandas as pd
    from PIL import PngImagePlugin

    root, _ = champion
    incoming = root / "data" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    good = sorted((root / "data" / "landing" / "batch-0001" / "good").glob("*.png"))[0]
    (incoming / "good.png").write_bytes(good.read_bytes())
    Image.new("RGB", (1100, 1000), (128, 128, 128)).save(incoming / "wide.png")   # 1.1 M pixels, a few KB
    padding = PngImagePlugin.PngInfo()
    padding.add_text("padding", "".join(np.random.default_rng(0).choice(list("abcdefgh"), size=3_000_000)))
    Image.fromarray(_noise((64, 64, 3), 5)).save(incoming / "heavy.png", pnginfo=padding)  # > 2 MB, 64x64
    with (incoming / "huge.png").open("wb") as handle:
        handle.truncate(400 * 1024 * 1024)  # sparse
    result = run_cli(root, "score-incoming", "--claim", "limits", check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    table = pd.read_csv(root / "scores" / "limits.csv", keep_default_na=False).set_index("file")
    assert table.loc["good.png", "error"] == ""
    assert f"max_pixels={MAX_PIXELS}" in table.loc["wide.png", "error"]
    assert f"max_bytes={MAX_BYTES}" in table.loc["heavy.png", "error"]
    assert f"{400 * 1024 * 1024} bytes, over the limit max_bytes={MAX_BYTES}" in table.loc["huge.png", "error"]
    assert not [p for p in incoming.rglob("*") if p.is_file()]
    assert not [p for p in (root / "data" / "scored" / ".inflight").rglob("*") if p.is_file()]
