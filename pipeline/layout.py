"""Every file the stages read and write, derived from ``paths`` in params.yaml.

dvc.yaml declares the same files (a test keeps them equal); nothing else in the
project spells a path out.
"""
from __future__ import annotations

import configparser
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config

SPLITS = ("train", "calibration", "test")


@dataclass(frozen=True)
class Layout:
    root: Path
    config: Config

    def _p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ingest
    @property
    def landing(self) -> Path:
        landing = Path(self.config.data.landing)
        return landing if landing.is_absolute() else self.root / landing

    @property
    def raw(self) -> Path:
        return self._p(self.config.paths.raw)

    # validate
    @property
    def validation_dir(self) -> Path:
        return self._p(self.config.paths.reports, "validation")

    @property
    def manifest(self) -> Path:
        return self._p(self.config.paths.manifest)

    @property
    def validation_summary(self) -> Path:
        return self.validation_dir / "summary.json"

    @property
    def validation_html(self) -> Path:
        return self.validation_dir / "report.html"

    @property
    def validation_gx(self) -> Path:
        return self.validation_dir / "gx_result.json"

    # preprocess
    @property
    def processed(self) -> Path:
        return self._p(self.config.paths.processed)

    def split_items(self, split: str) -> Path:
        """A split's model inputs, as the data kind writes them (uint8 images, float32 rows)."""
        from pipeline.kinds import kind_of

        return kind_of(self.config).items_file(self.processed, split)

    @property
    def unit(self) -> str:
        """What one item of the data is called in messages: images, rows."""
        from pipeline.kinds import kind_of

        return kind_of(self.config).unit

    @property
    def transform(self) -> Path:
        """data.kind table: the feature encoding fitted on the training rows (detector/transform.py)."""
        return self.processed / "transform.json"

    @property
    def index(self) -> Path:
        return self.processed / "index.parquet"

    @property
    def preprocess_cache(self) -> Path | None:
        """preprocess's decoded-image cache: a folder inside the DVC cache this workspace uses
        (so every run workspace of a project shares it, and `dvc gc` leaves it alone); None
        outside a DVC repository. Not a DVC output: it outlives runs on purpose."""
        cache = dvc_cache_dir(self.root)
        return cache / "anomaly-preprocess" if cache is not None else None

    @property
    def table_stats_cache(self) -> Path | None:
        """validate's per-batch statistics of a table snapshot (pipeline/table_stats.py), beside
        the decoded-image cache in the DVC cache this workspace uses: every run of a project
        reads a batch's rows once. None outside a DVC repository."""
        cache = dvc_cache_dir(self.root)
        return cache / "anomaly-table-stats" if cache is not None else None

    # train
    @property
    def models(self) -> Path:
        return self._p(self.config.paths.models)

    @property
    def weights(self) -> Path:
        return self.models / "model.pt"

    @property
    def spec(self) -> Path:
        return self.models / "spec.json"

    @property
    def scores(self) -> Path:
        return self.models / "scores.parquet"

    @property
    def checkpoints(self) -> Path:
        return self.models / "checkpoints"

    @property
    def train_metrics(self) -> Path:
        return self._p(self.config.paths.reports, "train.json")

    @property
    def train_history(self) -> Path:
        return self._p(self.config.paths.reports, "train_history.csv")

    # calibrate
    @property
    def threshold(self) -> Path:
        return self.models / "threshold.json"

    @property
    def calibration_normals(self) -> Path:
        """The normal calibration items' scores, sorted: the served model's p-values are ranks in them."""
        return self.models / "calibration_normals.npy"

    # evaluate
    @property
    def metrics(self) -> Path:
        return self._p(self.config.paths.reports, "metrics.json")

    @property
    def plots(self) -> Path:
        return self._p(self.config.paths.reports, "plots")

    @property
    def roc_points(self) -> Path:
        return self._p(self.config.paths.reports, "roc.csv")

    # register / promote (not DVC stages)
    @property
    def gates(self) -> Path:
        return self._p(self.config.paths.reports, "gates.json")

    @property
    def run_summary(self) -> Path:
        return self._p(self.config.paths.reports, "run_summary.json")

    # score (the scoring DAG; outside DVC)
    def _in_project(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else self.root / path

    @property
    def incoming(self) -> Path:
        return self._in_project(self.config.score.incoming)

    @property
    def scored_archive(self) -> Path:
        return self._in_project(self.config.score.archive)

    @property
    def score_results(self) -> Path:
        return self._in_project(self.config.score.results)

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"


def dvc_cache_dir(root: Path) -> Path | None:
    """The DVC cache folder of the repository at ``root``, as DVC resolves it from the repo's
    own config: ``[cache] dir`` of .dvc/config.local, else of .dvc/config (a relative path is
    relative to .dvc/), else .dvc/cache. None when ``root`` has no .dvc folder. (A cache dir set
    only in the user's global or system DVC config is not read: the workspaces set theirs locally.)"""
    dvc = Path(root) / ".dvc"
    if not dvc.is_dir():
        return None
    for name in ("config.local", "config"):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            parser.read(dvc / name, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        value = parser.get("cache", "dir", fallback="").strip().strip("'\"")
        if value:
            path = Path(value).expanduser()
            return path if path.is_absolute() else (dvc / path).resolve()
    return dvc / "cache"
