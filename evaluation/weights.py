"""The pretrained networks of the metrics: which registered asset each needs, and their loaders.

Every file is read from a local path (``python -m moditalker.assets check`` lists them); nothing is
downloaded here. ``random=True`` builds the same network with seeded random weights instead (smoke
runs and tests; the numbers are then meaningless and the report says so).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from moditalker.assets import asset_present, missing_message, require_asset
from moditalker.checkpoint import load_strict, read_checkpoint, unwrap_state_dict
from moditalker.errors import UserError

METRICS = ("psnr", "ssim", "lpips", "fid", "fvd", "lmd", "lse", "csim", "cpbd")

#: metric -> the registered assets it needs (none: the metric is pure computation)
METRIC_ASSETS: dict[str, tuple[str, ...]] = {
    "psnr": (),
    "ssim": (),
    "cpbd": (),
    "lpips": ("lpips_alexnet",),
    "fid": ("fid_inception",),
    "fvd": ("i3d_400",),
    "lmd": ("face_alignment",),
    "lse": ("syncnet",),
    "csim": ("arcface", "face_alignment"),
}

FIX = "re-download it (see `python -m moditalker.assets check`)"


def missing_assets(metric: str, overrides: dict[str, str | Path] | None = None) -> list[str]:
    """One line per missing asset of ``metric`` (empty: every file is there)."""
    overrides = overrides or {}
    return [
        missing_message(a, overrides.get(a))
        for a in METRIC_ASSETS[metric]
        if not asset_present(a, overrides.get(a))
    ]


def _freeze(net: nn.Module, device: torch.device) -> nn.Module:
    net.eval().to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _state(path: Path, what: str) -> dict:
    state = unwrap_state_dict(read_checkpoint(path, what), path)
    return {k: (v.float() if torch.is_floating_point(v) else v) for k, v in state.items()}


def _with_bn_counters(net: nn.Module, state: dict) -> dict:
    """Old checkpoints (before PyTorch 0.4) have no ``num_batches_tracked``; add the model's own."""
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    return state


@torch.no_grad()
def _calibrate_bn(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """Random networks only: set every BatchNorm's running statistics from one forward pass of
    ``example``, so that activations neither vanish nor explode (an uncalibrated random Inception
    gives features ~1e-8 and every FID ~0)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
    net.train()
    net(example)
    return net.eval()


def build_lpips(path: str | Path | None, device: torch.device, random: bool = False) -> nn.Module:
    """LPIPS v0.1 with the AlexNet backbone (linear heads from the lpips package, AlexNet from
    ``path``: a torchvision AlexNet ImageNet state_dict)."""
    import lpips

    path = None if random else require_asset("lpips_alexnet", path)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        state = _state(path, "LPIPS AlexNet")
        where = {k.split(".", 1)[1]: k for k in model.net.state_dict()}  # "3.weight" -> "slice2.3.weight"
        mapped = {
            where[k.removeprefix("features.")]: v for k, v in state.items() if k.startswith("features.")
        }
        load_strict(model.net, mapped, path, "LPIPS AlexNet backbone", "torchvision alexnet.features", FIX)
    return _freeze(model, device)


def build_inception(path: str | Path | None, device: torch.device, random: bool = False) -> nn.Module:
    """pytorch-fid's InceptionV3 returning the 2048-d pool3 features (input [0, 1], resized to 299
    inside), with the FID weights from ``path`` (``pt_inception-2015-12-05-6726825d.pth``)."""
    import pytorch_fid.inception as fid_inception
    import torchvision

    if random:
        torch.manual_seed(0)
        state = torchvision.models.inception_v3(
            weights=None, aux_logits=False, num_classes=1008, init_weights=False
        ).state_dict()
    else:
        path = require_asset("fid_inception", path)
        state = _state(path, "FID InceptionV3")
    original = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state  # never the network
    try:
        with warnings.catch_warnings():  # torchvision's note on its default initialisation
            warnings.simplefilter("ignore", FutureWarning)
            model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except RuntimeError as exc:  # load_state_dict mismatch
        raise UserError(
            f"{path} is not the FID InceptionV3 state_dict ({str(exc).splitlines()[0]}); {FIX}"
        ) from exc
    finally:
        fid_inception.load_state_dict_from_url = original
    if random:
        _calibrate_bn(model, torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)))
    return _freeze(model, device)


def build_i3d(path: str | Path | None, device: torch.device, random: bool = False) -> nn.Module:
    """Inception-I3D (400 classes) with the weights of ``i3d_pretrained_400.pt``."""
    from evaluation.i3d import InceptionI3d

    torch.manual_seed(0)
    net = InceptionI3d(400)
    if not random:
        path = require_asset("i3d_400", path)
        load_strict(net, _with_bn_counters(net, _state(path, "I3D")), path, "I3D", "InceptionI3d(400)", FIX)
    else:
        _calibrate_bn(net, torch.rand(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return _freeze(net, device)


def build_syncnet(path: str | Path | None, device: torch.device, random: bool = False) -> nn.Module:
    """SyncNet with the weights of ``syncnet_v2.model``."""
    from evaluation.syncnet import SyncNet

    torch.manual_seed(0)
    net = SyncNet()
    if not random:
        path = require_asset("syncnet", path)
        load_strict(net, _with_bn_counters(net, _state(path, "SyncNet")), path, "SyncNet", "SyncNet v2", FIX)
    return _freeze(net, device)


def build_arcface(path: str | Path | None, device: torch.device, random: bool = False) -> nn.Module:
    """ArcFace IResNet; the depth (18/34/50/100) is read from the checkpoint (random: r18)."""
    from evaluation.arcface import LAYERS, IResNet

    torch.manual_seed(0)
    if random:
        return _freeze(IResNet(18), device)
    path = require_asset("arcface", path)
    state = _state(path, "ArcFace")
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    depth = next((d for d, n in LAYERS.items() if n == blocks), 100)
    net = IResNet(depth)
    load_strict(net, _with_bn_counters(net, state), path, "ArcFace", f"IResNet-{depth}", FIX)
    return _freeze(net, device)


def build_landmarks(
    path: str | Path | None, device: torch.device, random: bool = False, batch_size: int = 16
):
    """The FAN landmark detector of :mod:`data.landmarks` (random: the fixed template face)."""
    from data.landmarks import FaceLandmarkDetector, template_face_detector

    if random:
        return FaceLandmarkDetector(device, detector=template_face_detector, batch_size=batch_size)
    return FaceLandmarkDetector(device, weights_dir=path, batch_size=batch_size)
