"""Score a folder of images with a registered model (the champion by default)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.io import StageError
from pipeline.layout import Layout

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def run(layout: Layout, folder: Path, out: Path | None, model_uri: str | None = None) -> pd.DataFrame:
    import mlflow

    from components.registry import connect
    from pipeline import tracking
    from pipeline.stages.register import score_bytes

    folder = Path(folder)
    if not folder.is_dir():
        raise StageError(f"score: folder does not exist: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise StageError(f"score: no PNG or JPEG files under {folder}")
    client = connect(tracking.store(layout))
    name = layout.config.registry.model_name
    model_uri = model_uri or f"models:/{name}@champion"
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as error:
        raise StageError(f"score: cannot load {model_uri}: {error}") from None
    version = ""
    if model_uri.startswith(f"models:/{name}@"):
        version = str(client.get_model_version_by_alias(name, model_uri.split("@", 1)[1]).version)
    from components.images import ImageDecodeError, open_image

    good, errors = [], {}
    for path in files:
        data = path.read_bytes()
        try:
            open_image(data).close()
            good.append((path, data))
        except ImageDecodeError as error:  # one bad file must not stop the others being scored
            errors[str(path)] = str(error)
    predictions = score_bytes(model, [data for _, data in good])
    table = pd.DataFrame({"file": [str(p) for p, _ in good], "anomaly_score": predictions["anomaly_score"],
                          "is_anomaly": predictions["is_anomaly"].astype(bool), "error": ""})
    if errors:
        bad = pd.DataFrame({"file": list(errors), "anomaly_score": float("nan"), "is_anomaly": False,
                            "error": list(errors.values())})
        table = pd.concat([table, bad], ignore_index=True)
        for path, reason in errors.items():
            print(f"score: NOT scored {path}: {reason}")
    table["model_uri"], table["model_version"] = model_uri, version
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
    flagged = int(table["is_anomaly"].sum())
    print(f"score: {len(table)} images with {model_uri} (v{version or '?'}): {flagged} flagged as anomalous"
          + (f"; written to {out}" if out else ""))
    return table
