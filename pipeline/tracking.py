"""Where MLflow lives for this project, and what a run records about its origins."""
from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from pipeline.layout import Layout

MODEL_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow")


def tracking_uri(layout: Layout) -> str:
    """MLFLOW_TRACKING_URI, else registry.tracking_uri, else a SQLite file in the project."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or layout.config.registry.tracking_uri
            or f"sqlite:///{(layout.root / 'mlflow.db').resolve()}")


def artifact_root(layout: Layout) -> str | None:
    """Artifacts beside the SQLite file by default; a server decides its own."""
    uri = tracking_uri(layout)
    if os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        return os.environ["MLFLOW_ARTIFACT_ROOT"]
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return (layout.root / "mlartifacts").resolve().as_uri()
    return None


def shown(uri: str) -> str:
    """A tracking URI fit for a log line or a report: a user or password in it (MLFLOW_TRACKING_URI
    may hold one; params.yaml may not) is replaced by *** (pipeline.secrets.scrub)."""
    from pipeline.secrets import scrub

    return scrub(uri)


# MLflow prints "View run ... at: <tracking URL>/#/..." each time a run ends, URL password and all
QUIET_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def client_env(uri: str) -> dict[str, str]:
    """What a process that talks to ``uri`` needs besides it: where the URI holds credentials,
    MLflow's run links are not printed (the pipeline prints its own, with shown())."""
    return {QUIET_LINKS: "true"} if shown(uri) != uri else {}


def local_store(layout: Layout) -> Path | None:
    """The SQLite file or the file-store folder of a store on this machine; None for a server."""
    from urllib.parse import urlparse

    uri = tracking_uri(layout)
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])  # sqlite:////abs or sqlite:///rel
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" not in uri and not uri.startswith("databricks"):
        return Path(uri)
    return None


def promotion_lock(layout: Layout) -> Path:
    """The lock file that serialises alias moves on one registry (pipeline.registry.promotion_lock):
    beside a SQLite or file store, else per tracking URI in the user's cache folder (or the
    temporary folder, where there is no writable home)."""
    import hashlib
    import tempfile

    local = local_store(layout)
    if local is not None:
        return local.with_suffix(".promote.lock") if tracking_uri(layout).startswith("sqlite:") \
            else local / ".promote.lock"
    name = f"promote-{hashlib.sha256(tracking_uri(layout).encode()).hexdigest()[:16]}.lock"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anomaly-pipeline"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir())
    return cache / name


def store(layout: Layout):
    from pipeline.registry import Store

    return Store(tracking_uri=tracking_uri(layout), artifact_root=artifact_root(layout))


def git_info(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the code that ran. In a run's workspace (pipeline.workspace)
    these are the project's, recorded when the workspace was made from it."""
    import json

    from pipeline.workspace import RECORD

    record = Path(root) / RECORD
    if record.is_file():
        made = json.loads(record.read_text())
        if "project_dirty" in made:
            return {"git_commit": made["commit"], "git_dirty": str(bool(made["project_dirty"])).lower()}

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(dirty)).lower() if commit else "unknown"}


def uncommitted_patch(root: Path) -> bytes:
    """The code that ran, as a binary patch against its commit: every change to a tracked file,
    staged or not, and the untracked files under the code folders; never a file whose name
    looks like a secret (pipeline/code_changes.py says which). params.yaml and dvc.lock are
    left out (the run records them whole), and so are DVC's .gitignore files and a run
    workspace's own record. ``reproduce`` applies it to rebuild a dirty run's code.

    Bytes, not text: a patch must apply byte for byte (CRLF, other encodings). A throw-away
    index is used, so the repository's own index is never touched.
    """
    import sys
    import tempfile

    from pipeline.code_changes import code_changes

    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(scratch) / "index")}

        def git(*args: str, stdin: bytes | None = None) -> bytes:
            return subprocess.run(["git", *args], cwd=root, env=env, input=stdin, capture_output=True, check=True,
                                  timeout=120).stdout

        try:
            changes = code_changes(root)
            if changes.left_out:
                print(f"uncommitted.patch: left out {len(changes.left_out)} file(s) whose names look like secrets: "
                      + ", ".join(changes.left_out), file=sys.stderr)
            git("read-tree", "HEAD")
            if changes.recorded:  # by name, not pathspec: no glob in a file name can take in more
                git("update-index", "--add", "--remove", "-z", "--stdin",
                    stdin=b"".join(name.encode("utf-8", "surrogateescape") + b"\0" for name in changes.recorded))
            return git("diff", "--cached", "--binary", "HEAD", "--", ".", ":(exclude)params.yaml",
                       ":(exclude)dvc.lock", ":(exclude)**/.gitignore", ":(exclude).workspace.json")
        except (OSError, subprocess.SubprocessError):
            return b""


def data_version(layout: Layout) -> str:
    """The DVC hash of the raw snapshot, as dvc.lock records it."""
    if not layout.dvc_lock.is_file():
        return "unknown"
    lock = yaml.safe_load(layout.dvc_lock.read_text()) or {}
    raw = layout.config.paths.raw
    for out in lock.get("stages", {}).get("ingest", {}).get("outs", []):
        if out.get("path") == raw:
            return str(out.get("md5", "unknown"))
    return "unknown"


def environment() -> dict[str, str]:
    import platform

    packages = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"])
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": "\n".join(packages)}


# what the feature families (patchcore, padim) need on top: anomalib's torch models and timm's backbones
FEATURE_MODEL_REQUIREMENTS = ("anomalib", "timm", "torchvision")


def model_requirements(family: str | None = None) -> list[str]:
    """The served model's pip requirements, pinned to this environment's versions."""
    from detector.backbones import FEATURE_FAMILIES

    names = MODEL_REQUIREMENTS + (FEATURE_MODEL_REQUIREMENTS if family in FEATURE_FAMILIES else ())
    return [f"{name}=={metadata.version(name)}" for name in names]
