"""Issue 18, item 6: does a semi-supervised head on the frozen pretrained features (Deep SAD on
PatchCore's patch embeddings) beat plain PatchCore where a few labelled defects exist?

A measurement, not a family: it ships as one only if it wins. The head sees exactly PatchCore's
patch embeddings (EfficientNet-Lite0 blocks.2 at 224 px, 3x3 average-pooled: 28 x 28 patches of
40 channels per image) and is trained like detector/networks.DeepSAD, at the patch level:

* a bias-free MLP (40 -> 64 -> 32) maps each patch to a latent point; its centre c is the mean
  latent of the normal training patches (near-zero coordinates pushed to +-0.1, as DeepSAD does);
* loss: the mean squared distance to c of the normal images' patches, plus, for each labelled
  defective image, eta / (the largest patch distance in it): the defect is somewhere in the image,
  and the patch farthest from c is the best guess of where (multiple-instance learning);
* score: an image's largest patch distance. 30 epochs of Adam (lr 1e-3, weight decay 1e-6),
  batches of 16 images, seeded.

``python -c 'from benchmarks.frozen_head import compare; compare()'`` prints both families' AUROC
per texture on the surfaces set (with its labelled defects: 4 of each kind per texture).
"""
from __future__ import annotations

import numpy as np

SIZE = 224
EPOCHS = 30


def _patch_features(model, images: np.ndarray, batch: int = 32):
    """PatchCore's patch embeddings (N x P x C) of uint8 images, from its own extractor."""
    import torch

    from detector.scoring import to_tensor

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            flat, (count, height, width) = model._embed(to_tensor(images[start:start + batch], torch.device("cpu")))
            out.append(flat.reshape(count, height * width, -1))
    return torch.cat(out)


def deep_sad_head_scores(train_features, train_labels: np.ndarray, test_features, seed: int, eta: float = 1.0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    channels = train_features.shape[-1]
    head = nn.Sequential(nn.Linear(channels, 64, bias=False), nn.LeakyReLU(0.1), nn.Linear(64, 32, bias=False))
    labels = torch.from_numpy(np.asarray(train_labels, np.float32))
    with torch.no_grad():
        centre = head(train_features[labels < 0.5].reshape(-1, channels)).mean(0)
        centre[(centre.abs() < 0.1) & (centre < 0)] = -0.1
        centre[(centre.abs() < 0.1) & (centre >= 0)] = 0.1
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-6)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for index in torch.randperm(len(train_features), generator=generator).split(16):
            distance = (head(train_features[index]) - centre).pow(2).sum(-1)   # images x patches
            normal = labels[index] < 0.5
            loss = distance[normal].mean() if normal.any() else distance.sum() * 0
            if (~normal).any():
                loss = loss + (eta / (distance[~normal].amax(1) + 1e-6)).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        return (head(test_features) - centre).pow(2).sum(-1).amax(1).double().numpy()


def compare(seed: int = 42) -> dict[str, dict[str, float]]:
    from sklearn.metrics import roc_auc_score

    from benchmarks.surfaces import TEXTURES, resized, surface_set
    from components.training import TrainSettings, train
    from detector.scoring import score

    results: dict[str, dict[str, float]] = {}
    for texture in TEXTURES:
        data = surface_set(texture, seed)
        train_x, test_x = resized(data.train_x, SIZE), resized(data.test_x, SIZE)
        spec = {"family": "patchcore", "channels": 3, "image_size": SIZE, "backbone": "efficientnet_lite0",
                "layers": None, "backbone_weights": "auto", "coreset_ratio": 0.1, "max_bank": 10_000,
                "num_neighbors": 9}
        fitted = train(spec, train_x, data.train_y, TrainSettings(epochs=1, batch_size=32, learning_rate=1e-3,
                                                                  seed=seed, device="cpu"), progress=False)
        patchcore = score(fitted.model, test_x)
        head = deep_sad_head_scores(_patch_features(fitted.model, train_x), data.train_y,
                                    _patch_features(fitted.model, test_x), seed)
        results[texture] = {"patchcore": float(roc_auc_score(data.test_y, patchcore)),
                            "deep_sad_head": float(roc_auc_score(data.test_y, head))}
        print(texture, results[texture], flush=True)
    for method in ("patchcore", "deep_sad_head"):
        print(method, "mean AUROC", round(float(np.mean([r[method] for r in results.values()])), 3))
    return results
