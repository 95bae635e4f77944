"""ingest: snapshot the landing folder into the DVC-tracked raw folder.

The raw folder's DVC hash (in dvc.lock) is the data version recorded with every model.
"""
from __future__ import annotations

import shutil

from pipeline.io import StageError, atomic_path
from pipeline.layout import Layout


def run(layout: Layout) -> dict:
    landing = layout.landing
    if not landing.is_dir():
        raise StageError(f"data.landing: folder does not exist: {landing}")
    ignore = shutil.ignore_patterns(".*")  # hidden files and half-written '.partial' batches
    with atomic_path(layout.raw) as tmp:
        shutil.copytree(landing, tmp, ignore=ignore)
    files = [p for p in layout.raw.rglob("*") if p.is_file()]
    batches = sorted(p.name for p in layout.raw.iterdir() if p.is_dir())
    print(f"ingest: {len(files)} files from {landing} -> {layout.raw} ({len(batches)} folders: {', '.join(batches[:8])}"
          f"{' ...' if len(batches) > 8 else ''})")
    return {"files": len(files)}
