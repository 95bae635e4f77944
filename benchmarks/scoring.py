"""2. Scoring overhead: the registered pyfunc's ``predict`` against the same work by hand.

One scratch project runs the whole retraining once (few epochs: scoring speed does not
depend on how well the model trained), which registers a pyfunc in its MLflow store.
Then, in this process and side by side, the same batch of encoded PNGs is scored by
- the served model: ``mlflow.pyfunc.load_model("models:/anomaly-detector/1").predict(frame)``;
- a hand-written path: Pillow decode, convert, resize, stack, scale to [0, 1], then the
  same network's ``score`` in batches of 128 under ``torch.no_grad``: what an engineer
  would write without MLflow, with none of the pyfunc's input checks and decoding limits.
Both must give the same scores (checked), so they did the same work.
"""
from __future__ import annotations

import io
import time

from benchmarks.common import Context, Figure, check, ratios
from benchmarks.training import prepared_project

TITLE = "2. Scoring overhead: registered pyfunc vs decode + preprocess + forward by hand"


def _by_hand(network, images: list[bytes], size: int, channels: int):
    import numpy as np
    import torch
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert(mode).resize((size, size), Image.Resampling.BILINEAR,
                                                          reducing_gap=None))
        arrays.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
    batch = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
    network.eval()
    with torch.no_grad():
        return torch.cat([network.score(batch[i:i + 128]) for i in range(0, len(batch), 128)]).double().numpy()


def run(ctx: Context) -> list[Figure]:
    import mlflow
    import numpy as np
    import pandas as pd
    import torch
    import yaml

    # the default family for images (patchcore at 224 px, params.yaml), fitted on the benchmark's batch
    root = prepared_project(ctx, "scoring", {"train": {"epochs": 1 if ctx.quick else 3},
                                             "model": {"type": "patchcore"}, "preprocess": {"image_size": 224}},
                            stages=("run",))
    params = yaml.safe_load((root / "params.yaml").read_text())
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{params['registry']['model_name']}/1")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    network = model.unwrap_python_model().model
    files = sorted((root / "data" / "raw").rglob("*.png"))[: 64 if ctx.quick else 256]
    images = [f.read_bytes() for f in files]
    frame = pd.DataFrame({"image": images})
    size, channels = params["preprocess"]["image_size"], params["preprocess"]["channels"]

    served = model.predict(frame)["anomaly_score"].to_numpy()  # warm-up, and the parity check
    hand = _by_hand(network, images, size, channels)
    difference = float(np.max(np.abs(served - hand)))
    assert difference < 1e-4, f"the two paths disagree by {difference}: they did not do the same work"

    pyfunc_rate, hand_rate = [], []
    for _ in range(ctx.repeats):
        started = time.perf_counter()
        model.predict(frame)
        pyfunc_rate.append(len(images) / (time.perf_counter() - started))
        started = time.perf_counter()
        _by_hand(network, images, size, channels)
        hand_rate.append(len(images) / (time.perf_counter() - started))
    note = f"{len(images)} PNGs of {files and _side(files[0])} px -> {channels}x{size}x{size}, " \
           f"{params['model']['type']}, {torch.get_num_threads()} threads, CPU"
    family = params["model"]["type"]  # keys name it: the figures before 2026-12-04 were deep_sad's at 64 px
    return [
        Figure(f"scoring.{family}.pyfunc_images_per_s", "pyfunc predict", "images/s", pyfunc_rate, note=note,
               higher_is_better=True),
        Figure(f"scoring.{family}.hand_images_per_s", "by hand (Pillow + torch)", "images/s", hand_rate,
               higher_is_better=True),
        check(Figure(f"scoring.{family}.ratio", "pyfunc / by hand", "ratio", ratios(pyfunc_rate, hand_rate),
                     higher_is_better=True), at_least=0.8),
    ]


def _side(path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.size[0]
