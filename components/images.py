"""Finding images in a landing folder: their labels, content hashes and formats.

Decoding is detector/decode.py's: one decode path serves preprocess, validation and the
served model, so that what the model sees in service is byte for byte what it saw in training.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


NORMAL_LABEL = "good"
_EXT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


@dataclass(frozen=True)
class ImageFile:
    path: Path          # absolute or relative path on disk
    relpath: str        # path inside the snapshot, with forward slashes: <batch>/<label>/<name>
    batch: str
    label: str

    @property
    def is_anomaly(self) -> bool:
        return self.label != NORMAL_LABEL


def _label_dirs(batch_dir: Path) -> list[tuple[str, Path]]:
    """(label, folder) pairs of one batch: plain layout or MVTec AD layout."""
    if (batch_dir / "train" / NORMAL_LABEL).is_dir() and (batch_dir / "test").is_dir():
        # MVTec AD: train/good, test/good, test/<defect>; ground_truth/ masks are not used
        pairs = [(NORMAL_LABEL, batch_dir / "train" / NORMAL_LABEL)]
        pairs += [(p.name, p) for p in sorted((batch_dir / "test").iterdir()) if p.is_dir()]
        return pairs
    return [(p.name, p) for p in sorted(batch_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def discover(root: Path, extensions: tuple[str, ...] | list[str] = (".png", ".jpg", ".jpeg"),
             include_all_files: bool = False) -> list[ImageFile]:
    """Every labelled file under root, in a stable order.

    root holds batch folders (``<batch>/<label>/*``). A root that is itself one batch
    (it has a ``good/`` folder, or MVTec's ``train/good``) is read as a batch named after it.
    With include_all_files, files with other extensions are listed too, so that
    validation can name them instead of silently skipping them. A symbolic link (file or
    folder) is followed only when it stays inside root; one that leaves it, or dangles,
    raises ValueError naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder does not exist: {root}")
    real_root = root.resolve()

    def inside(path: Path) -> None:
        """A symbolic link is followed only into ``root``: ingest's snapshot holds none, so one
        here (a hand-made folder) is refused by name rather than read from wherever it points."""
        real = path.resolve()
        if not real.exists():
            raise ValueError(f"{path.relative_to(root).as_posix()} -> {real}: a dangling link")
        if not real.is_relative_to(real_root):
            raise ValueError(f"{path.relative_to(root).as_posix()} -> {real}: a link that leaves {root}; not read")

    single = (root / NORMAL_LABEL).is_dir() or (root / "train" / NORMAL_LABEL).is_dir()
    batches = [root] if single else [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    wanted = {e.lower() for e in extensions}
    files: list[ImageFile] = []
    for batch_dir in batches:
        for label, folder in _label_dirs(batch_dir):
            inside(folder)  # the batch's and the label's folders, whichever of them is a link
            for path in sorted(folder.rglob("*")):
                if path.name.startswith("."):
                    continue
                if path.is_symlink():
                    inside(path)
                if not path.is_file():
                    continue
                if not include_all_files and path.suffix.lower() not in wanted:
                    continue
                rel = path.relative_to(root).as_posix()
                files.append(ImageFile(path=path, relpath=rel, batch=batch_dir.name, label=label))
    return files


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_for_extension(suffix: str) -> str | None:
    return _EXT_FORMATS.get(suffix.lower())


