"""DVC's own command line (``COMMAND <dvc args>``) with one fix to its run cache, for every
``dvc repro`` the pipeline runs (``pipeline run``, each Airflow stage task, reproduce). Run
workspaces share the project's DVC cache, and with it the run cache
(``<cache>/runs/<stage key>/<entry>``), so two runs at once can write and read one stage's
entries at the same moment. (The other DVC commands the pipeline runs never read it.)

The bug (DVC 3.67.1, ``dvc.stage.cache.StageCache._load``): a run about to start a stage
lists the stage's entries, takes the newest by mtime and reads it; if that does not parse,
it deletes it as corrupted. The newest file can be another process's entry still being
written, under DVC's temporary name (``.<token>.tmp``), and empty. The reader deletes it,
and the writer, a run that has just finished the stage, fails with ``[Errno 2] No such file
or directory: '<cache>/runs/…/.<token>.tmp'`` (seen in CI, two scheduled runs at once; the
reader can also fail, on ``getmtime`` of a temporary file renamed away under it).

The fix: ``_load`` passes over temporary names and over entries that vanish while it
looks. A finished entry is renamed into place whole, so what is left is exactly what DVC
means to read. tests/pipeline/test_dvc_cli.py shows the bug in plain DVC beside the fix,
so the day DVC fixes it upstream that test says so and this module can go.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# This module by its path, not ``-m pipeline.dvc_cli``: -m looks in the working directory first,
# a run's workspace or reproduce's checkout of an old commit, whose pipeline package may
# predate this module (an Airflow retry of a run made before an upgrade). Only an editable
# install's import hook would then still find it.
COMMAND = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
           "from pipeline.dvc_cli import main; sys.exit(main(sys.argv[1:]))"]


def _is_entry(name: str) -> bool:
    """A finished run-cache entry (a hash); DVC writes each under ``.<token>.tmp`` and
    ``<hash>.<token>.tmp`` first, then renames it."""
    return not name.startswith(".") and not name.endswith(".tmp")


def patch_run_cache() -> None:
    from dvc.stage import cache

    def _load(self, stage):
        key = cache._get_stage_hash(stage)
        if not key:
            return None
        folder = self._get_cache_dir(key)
        try:
            names = [name for name in os.listdir(folder) if _is_entry(name)]
        except FileNotFoundError:
            return None
        entries = []
        for name in names:
            try:
                entries.append((os.path.getmtime(os.path.join(folder, name)), name))
            except FileNotFoundError:  # removed while we looked (a corrupted entry another run dropped)
                continue
        if not entries:
            return None
        return self._load_cache(key, max(entries)[1]) or None

    if not hasattr(cache.StageCache, "_load"):  # a DVC that changed this: fail loudly, not silently unpatched
        raise RuntimeError("dvc.stage.cache.StageCache._load is gone: review pipeline/dvc_cli.py for this DVC")
    cache.StageCache._load = _load


def main(argv: list[str]) -> int:
    patch_run_cache()
    from dvc.cli import main as dvc_main

    return dvc_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
