"""The scoring DAG's work (pipeline/score.py ``incoming``) against the faults that used to jam
it or kill it on every run (issue 19, item 5):

- a claim that fails twice under one name (Airflow retries the task with the same run id):
  the second is set aside under a fresh name, nothing stays in ``.inflight``, and the next
  run scores as usual; a deployment the old code had already jammed recovers on its own;
- a 400 MB file is refused by its size on disk against the champion's ``max_bytes``, by name,
  without a byte of it being read;
- the pre-check decodes with the champion's limits (its spec.json's ``decode_limits``), not
  the defaults: a file between the two is refused by name, and the other files are scored.

The champion is a real pyfunc (an untrained image autoencoder, logged and registered as
register does, into a SQLite store of its own); only the registry look-up is replaced.
"""
from __future__ import annotations

import builtins
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipeline import score
from pipeline.config import load
from pipeline.io import StageError
from pipeline.layout import Layout

PROJECT = Path(__file__).resolve().parents[2]
# the champion's decoding limits: far below the defaults (50 M pixels, 50 MiB)
MAX_PIXELS, MAX_BYTES = 64 * 64, 30_000


def _png(side: int, seed: int = 0, text: int = 0, flat: bool = False) -> bytes:
    """A noise PNG ``side`` pixels square (``flat``: one grey, a few hundred bytes however
    large); ``text`` bytes of metadata make it larger on disk."""
    rng = np.random.default_rng(seed)
    pixels = np.full((side, side, 3), 128, np.uint8) if flat else (rng.random((side, side, 3)) * 255).astype(np.uint8)
    info = PngImagePlugin.PngInfo()
    if text:  # random letters: a text chunk Pillow would otherwise compress
        info.add_text("padding", "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=text)))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """An image model whose spec.json carries decode_limits tighter than the defaults."""
    import mlflow
    import pandas as pd
    import torch

    from detector.networks import build
    from pipeline.registry import Store, connect, ensure_experiment, log_detector

    root = tmp_path_factory.mktemp("champion")
    spec = {"family": "autoencoder", "channels": 3, "image_size": 32, "width": 4, "latent_dim": 8}
    torch.manual_seed(0)
    torch.save(build(spec).state_dict(), root / "model.pt")
    client = connect(Store(f"sqlite:///{root / 'mlflow.db'}"))
    experiment = ensure_experiment(client, "tight", (root / "artifacts").as_uri())
    meta = {"spec": spec, "image_size": 32, "channels": 3,
            "decode_limits": {"max_pixels": MAX_PIXELS, "max_bytes": MAX_BYTES, "formats": ["PNG", "JPEG"]}}
    with mlflow.start_run(experiment_id=experiment):
        _, version = log_detector(root / "model.pt", meta, 0.5, pd.DataFrame({"image": [_png(32)]}),
                                  "anomaly-detector", [], PROJECT / "detector")
    return mlflow.pyfunc.load_model(f"models:/anomaly-detector/{version}"), f"sqlite:///{root / 'mlflow.db'}", version


@pytest.fixture
def layout(tmp_path, champion, monkeypatch) -> Layout:
    """The project's layout in a scratch folder, its registry the champion's store (where each
    scored batch is recorded on the version's monitoring run)."""
    model, store, version = champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setattr(score, "_load", lambda *args, **kwargs: (model, "models:/anomaly-detector@champion",
                                                                 version))
    return Layout(tmp_path, load(PROJECT / "params.yaml"))


def _inflight(layout: Layout) -> list[Path]:
    return sorted(p for p in (layout.scored_archive / score.INFLIGHT).rglob("*") if p.is_file())


def _drop(layout: Layout, name: str, data: bytes) -> None:
    layout.incoming.mkdir(parents=True, exist_ok=True)
    (layout.incoming / name).write_bytes(data)


def test_a_claim_that_fails_twice_under_one_name_is_set_aside_twice_and_the_next_run_is_not_jammed(layout,
                                                                                                monkeypatch):
    scoring_works = False
    real_score = score.score_files

    def flaky(*args, **kwargs):
        if not scoring_works:
            raise RuntimeError("the scorer broke")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(score, "score_files", flaky)
    failed = layout.scored_archive / "failed"
    _drop(layout, "a.png", _png(32, 1))
    with pytest.raises(StageError, match="set aside"):
        score.incoming(layout, "scheduled-1")
    _drop(layout, "b.png", _png(32, 2))
    with pytest.raises(StageError, match="set aside"):  # Airflow's retry: the same run, the same claim name
        score.incoming(layout, "scheduled-1")
    assert _inflight(layout) == []
    kept = {p.relative_to(failed).as_posix() for p in failed.rglob("*.png")}
    assert len(kept) == 2 and {Path(p).name for p in kept} == {"a.png", "b.png"}
    assert len({Path(p).parent for p in kept}) == 2  # two folders: the second failure took a fresh name
    for folder in {Path(p).parent for p in kept}:
        assert (failed / f"{folder}.error.txt").read_text().startswith("RuntimeError: the scorer broke")

    scoring_works = True
    _drop(layout, "c.png", _png(32, 3))
    summary = score.incoming(layout, "scheduled-2")
    assert summary["files"] == 1 and summary["failed_claims"] == [] and _inflight(layout) == []
    assert (layout.scored_archive / "scheduled-2" / "c.png").is_file()


def test_a_deployment_the_old_code_jammed_recovers_on_the_next_run(layout, monkeypatch):
    """What the old code left behind: a claim in .inflight whose name failed/ already holds
    (moving it there raised ENOTEMPTY on every run, and each run added its files to .inflight)."""
    inflight, failed = layout.scored_archive / score.INFLIGHT, layout.scored_archive / "failed"
    for folder, name in ((inflight / "scheduled-1", "late.png"), (failed / "scheduled-1", "early.png"),
                         (inflight / "scheduled-2", "later.png")):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(_png(32, len(name)))
    monkeypatch.setattr(score, "score_files", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("still broken")))
    with pytest.raises(StageError, match="2 claim"):
        score.incoming(layout, "scheduled-3")
    assert _inflight(layout) == []
    assert (failed / "scheduled-1" / "early.png").is_file()  # what was set aside before stays as it was
    assert sorted(p.name for p in failed.rglob("*.png")) == ["early.png", "late.png", "later.png"]


def test_a_400_mb_file_is_refused_by_its_size_without_being_read(layout, monkeypatch):
    _drop(layout, "good.png", _png(32, 4))
    huge = layout.incoming / "huge.png"
    with huge.open("wb") as handle:
        handle.truncate(400 * 1024 * 1024)  # sparse: 400 MB as far as stat() can tell, nothing on disk
    opened = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, bytes, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)
    summary = score.incoming(layout, "scheduled-1")
    monkeypatch.undo()
    assert not [p for p in opened if isinstance(p, str) and p.endswith("huge.png")], "the 400 MB file was opened"
    import pandas as pd

    table = pd.read_csv(summary["claims"][0]["results"], keep_default_na=False).set_index("file")
    assert table.loc["good.png", "error"] == ""
    refused = table.loc["huge.png", "error"]
    assert f"{400 * 1024 * 1024} bytes" in refused and f"max_bytes={MAX_BYTES}" in refused, refused
    assert summary["errors"] == 1 and _inflight(layout) == []


def test_the_pre_check_decodes_with_the_champions_limits_not_the_defaults(layout):
    """Both files are within the default limits and over the champion's: the old pre-check let
    them through, the champion then refused the whole batch, and the claim was set aside."""
    import pandas as pd

    _drop(layout, "good.png", _png(32, 5))
    _drop(layout, "wide.png", _png(100, flat=True))          # 10,000 pixels > 4,096, a few hundred bytes
    _drop(layout, "heavy.png", _png(32, 7, text=40_000))    # over 40 KB > 30,000 bytes
    assert len((layout.incoming / "heavy.png").read_bytes()) > MAX_BYTES
    summary = score.incoming(layout, "scheduled-1")
    assert summary["failed_claims"] == []
    table = pd.read_csv(summary["claims"][0]["results"], keep_default_na=False).set_index("file")
    assert table.loc["good.png", "error"] == "" and np.isfinite(float(table.loc["good.png", "anomaly_score"]))
    assert f"max_pixels={MAX_PIXELS}" in table.loc["wide.png", "error"]
    assert f"max_bytes={MAX_BYTES}" in table.loc["heavy.png", "error"]
    assert table.loc[["wide.png", "heavy.png"], "is_anomaly"].astype(str).eq("True").all()  # not scored: not normal


def test_pipeline_score_refuses_by_the_champions_limits_too(layout, tmp_path):
    """``pipeline score <folder>`` shares the pre-check (score_files)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.png").write_bytes(_png(32, 8))
    (folder / "wide.png").write_bytes(_png(100, flat=True))
    table = score.run(layout, folder, None).set_index("file")
    assert table.loc["good.png", "error"] == "" and f"max_pixels={MAX_PIXELS}" in table.loc["wide.png", "error"]
