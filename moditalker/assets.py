"""Registry of every external file the project can use: where it goes, where to get it, its licence.

Nothing here is downloaded at import or at run time by the rest of the code: each loader takes a
path (defaults below, all overridable by flags/configs) and, when the file is missing, fails with
a message that ends with "see `python -m moditalker.assets check`". This module is that check::

    python -m moditalker.assets check                     # every asset; exit 2 when one is missing or bad
    python -m moditalker.assets check --deep              # also read every byte / load the models
    python -m moditalker.assets check --only hubert bfm_front
    python -m moditalker.assets check --set hubert=/models/hubert   # check a non-default location
    python -m moditalker.assets table --markdown          # the Markdown table of checkpoints/README.md
    python -m moditalker.assets download                  # fetch HuBERT, FAN/s3fd, VGG16 (needs network)
    python -m moditalker.assets download moditalker       # the official checkpoints (Google Drive, gdown)
    python -m moditalker.assets download atom             # one of them (autoencoder_rgb, autoencoder_motion)
    python -m moditalker.assets download lpips_alexnet fid_inception syncnet   # evaluation weights

Default paths are relative to the checkpoints folder, which is ``<repo>/checkpoints`` unless the
environment variable ``MODITALKER_CHECKPOINTS`` names another folder.

The check looks at what the files hold, not only that they exist (see :mod:`moditalker.asset_content`:
cheap checks by default, reading every byte and loading the models with ``--deep``). The Google-Drive
downloads go to a hidden temporary name beside the target (``.atom.pt.download``; gdown keeps its partial
``.part`` file there, so running the command again resumes), are checked like ``check --deep`` and only
then renamed to the target: a failed or wrong download leaves nothing at the target path. The download
URL is ``https://drive.google.com/uc?id={id}`` unless ``MODITALKER_GDRIVE_URL`` gives another template
with ``{id}`` (a mirror, or a local server in the tests). Likewise ``MODITALKER_MIRROR=URL`` fetches the
public files (:data:`DOWNLOAD_URLS`) from ``URL/<host>/<path>`` instead of ``https://<host>/<path>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from moditalker.errors import UserError, cli_main
from moditalker.fileio import REPO_ROOT

__all__ = [
    "random_weights_banner",
    "warn_random_weights",
    "Asset",
    "ASSETS",
    "REPO_ROOT",
    "checkpoints_root",
    "default_path",
    "asset_present",
    "check_assets",
    "require_asset",
    "missing_message",
    "markdown_table",
    "download_asset",  # noqa: F822 - from moditalker.asset_download, on first use
    "inspect_asset",
    "inspect_assets",
    "GDRIVE_IDS",  # noqa: F822 - from moditalker.asset_download, on first use
    "download_gdrive_asset",  # noqa: F822 - from moditalker.asset_download, on first use
    "main",  # noqa: F822 - moditalker.assets_cli, on first use
]

CHECK_HINT = "see `python -m moditalker.assets check`"


@dataclass(frozen=True)
class Asset:
    """One external file or folder: its default location and how to obtain it."""

    name: str
    path: str  # relative to the checkpoints folder
    what: str
    source: str
    licence: str
    used_by: str
    # For folders: the files that must exist inside; a tuple of alternatives means "any of these".
    contents: tuple[str | tuple[str, ...], ...] = field(default_factory=tuple)
    optional: bool = False  # the pipeline can run without it (training-only or has a fallback)


_MODITALKER = (
    "MoDiTalker README, Google-Drive links (github.com/cvlab-kaist/MoDiTalker, formerly KU-CVLAB/MoDiTalker)"
)
_MODITALKER_LICENCE = "no licence file in the original repository; ask the authors before redistribution"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="atom",
            path="atom.pt",
            what="AToM audio-to-motion weights {model_state_dict, ema_state_dict, optimizer_state_dict}",
            source=f"{_MODITALKER}; or train your own with `python -m AToM.train`",
            licence=_MODITALKER_LICENCE,
            used_by="AToM.inference, pipeline",
        ),
        Asset(
            name="autoencoder_rgb",
            path="autoencoder_rgb.pth",
            what="MToV RGB tri-plane video autoencoder (plain state_dict)",
            source=f"{_MODITALKER}; or `python -m MToV.train_autoencoder`",
            licence=_MODITALKER_LICENCE,
            used_by="MToV.sample, MToV training, pipeline",
        ),
        Asset(
            name="autoencoder_motion",
            path="autoencoder_motion.pth",
            what="MToV landmark ('ldmk') video autoencoder (plain state_dict)",
            source=f"{_MODITALKER}; or `python -m MToV.train_autoencoder` with the ldmk config",
            licence=_MODITALKER_LICENCE,
            used_by="MToV.sample, MToV diffusion training, pipeline",
        ),
        Asset(
            name="diffusion_model",
            path="diffusion_model.pth",
            what="MToV latent diffusion UNet (DiffusionWrapper state_dict)",
            source="NOT released by the authors (their issues #7, #14, #18); train it with "
            "`python -m MToV.train_diffusion`",
            licence="your own training run",
            used_by="MToV.sample, pipeline",
        ),
        Asset(
            name="bfm_front",
            path="BFM/BFM_model_front.mat",
            what="Basel Face Model 2009 front part with the expression basis (35709 vertices, 68 keypoints)",
            source="register and download BFM 2009 (01_MorphableModel.mat) at "
            "https://faces.dmi.unibas.ch/bfm/main.php?nav=1-2&id=downloads and Exp_Pca.bin "
            "(Guo et al. CoarseData), then convert with Deep3DFaceRecon_pytorch's BFM transfer script "
            "(github.com/sicxu/Deep3DFaceRecon_pytorch, 'Prepare prerequisite models'); the MoDiTalker "
            "README also links a converted copy",
            licence="Basel Face Model licence: non-commercial research only, registration required",
            used_by="data.face3d, data.recon3d, AToM inference, preprocessing",
        ),
        Asset(
            name="bfm_similarity",
            path="BFM/similarity_Lm3D_all.mat",
            what="standard 3D landmarks for the 5-point POS alignment of Deep3DFaceRecon",
            source="Deep3DFaceRecon_pytorch repository, folder BFM/ "
            "(github.com/sicxu/Deep3DFaceRecon_pytorch)",
            licence="MIT (Deep3DFaceRecon_pytorch)",
            used_by="data.recon3d, motion alignment",
        ),
        Asset(
            name="deep3d",
            path="deep3d/epoch_20.pth",
            what="Deep3DFaceRecon ResNet-50 coefficient regressor (257 coefficients), epoch 20",
            source="Deep3DFaceRecon_pytorch README, 'pretrained model' Google-Drive link "
            "(checkpoints/<name>/epoch_20.pth; GeneFace uses the same file)",
            licence="MIT (Deep3DFaceRecon_pytorch); trained on data with their own terms",
            used_by="data.recon3d (preprocessing, motion alignment)",
        ),
        Asset(
            name="hubert",
            path="hubert-large-ls960-ft",
            what="HuBERT-large fine-tuned on LibriSpeech 960h (transformers folder), 1024-d at 50 Hz",
            source="https://huggingface.co/facebook/hubert-large-ls960-ft : "
            "`hf download facebook/hubert-large-ls960-ft --local-dir checkpoints/hubert-large-ls960-ft`",
            licence="Apache-2.0",
            used_by="data.audio (HuBERT features for AToM)",
            contents=("config.json", ("model.safetensors", "pytorch_model.bin"), "preprocessor_config.json"),
        ),
        Asset(
            name="face_alignment",
            path="face_alignment",
            what="2D-FAN-4 landmark network and s3fd face detector of the face-alignment package",
            source="https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar and "
            "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth (face-alignment 1.5 "
            "fetches both into torch-hub's checkpoints/ cache on first use; that cache also counts)",
            licence="BSD-3-Clause (face-alignment)",
            used_by="data.landmarks (preprocessing, motion alignment)",
            contents=("2DFAN4-11f355bf06.pth.tar", "s3fd-619a316812.pth"),
        ),
        Asset(
            name="lpips_vgg16",
            path="lpips/vgg16.pth",
            what="torchvision VGG16 ImageNet weights, the LPIPS backbone (the LPIPS linear heads ship "
            "inside the lpips package)",
            source="https://download.pytorch.org/models/vgg16-397923af.pth "
            "(save it as checkpoints/lpips/vgg16.pth)",
            licence="BSD-3-Clause (torchvision); ImageNet terms apply to the weights",
            used_by="MToV autoencoder training (perceptual loss), evaluation",
            optional=True,
        ),
        Asset(
            name="lpips_alexnet",
            path="lpips/alexnet.pth",
            what="torchvision AlexNet ImageNet weights, the backbone of the LPIPS evaluation metric (the "
            "LPIPS linear heads ship inside the lpips package)",
            source="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth "
            "(save it as checkpoints/lpips/alexnet.pth)",
            licence="BSD-3-Clause (torchvision); ImageNet terms apply to the weights",
            used_by="evaluation (LPIPS)",
            optional=True,
        ),
        Asset(
            name="fid_inception",
            path="fid/pt_inception-2015-12-05-6726825d.pth",
            what="the FID InceptionV3 weights (TensorFlow's 2015-12-05 Inception ported by pytorch-fid)",
            source="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth",
            licence="Apache-2.0 (pytorch-fid; TensorFlow Inception weights)",
            used_by="evaluation (FID)",
            optional=True,
        ),
        Asset(
            name="i3d_400",
            path="fvd/i3d_pretrained_400.pt",
            what="Inception-I3D Kinetics-400 state_dict, the FVD network of the original evaluation code",
            source="the file the original MoDiTalker/PVDM FVD code loads (MToV/evals/fvd/download.py: "
            "Google-Drive id 1fBNl3TS0LA5FEhZv5nMGJs2_7qQmvTmh, i3d_pretrained_400.pt; also in "
            "TATS/PVDM releases)",
            licence="Apache-2.0 (DeepMind kinetics-i3d weights, PyTorch port)",
            used_by="evaluation (FVD)",
            optional=True,
        ),
        Asset(
            name="syncnet",
            path="syncnet/syncnet_v2.model",
            what="SyncNet v2 audio-visual sync network (LSE-C / LSE-D)",
            source="http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model "
            "(github.com/joonson/syncnet_python, download_model.sh)",
            licence="MIT (syncnet_python); weights released by the VGG group for research",
            used_by="evaluation (LSE)",
            optional=True,
        ),
        Asset(
            name="arcface",
            path="arcface/backbone.pth",
            what="ArcFace IResNet identity network (insightface arcface_torch backbone.pth, e.g. "
            "ms1mv3_arcface_r100_fp16), for CSIM",
            source="insightface model zoo, recognition/arcface_torch README (github.com/deepinsight/"
            "insightface): download ms1mv3_arcface_r100_fp16/backbone.pth",
            licence="insightface code MIT; the pretrained models are for non-commercial research only",
            used_by="evaluation (CSIM)",
            optional=True,
        ),
    )
}


def random_weights_banner(networks: str, result: str) -> str:
    """The loud ``--random_weights`` warning every command prints (to stderr): which ``networks`` are
    randomly initialised and what its ``result`` therefore is not."""
    width = 78
    text = (
        f"WARNING: --random_weights: {networks} RANDOMLY INITIALISED. {result} It only exercises the code. "
        "Put the real checkpoints in checkpoints/ for real results (see `python -m moditalker.assets check`)."
    )
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width - 4:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    bar = "#" * width
    return "\n".join([bar, *(f"# {x:<{width - 4}} #" for x in lines), bar])


def warn_random_weights(networks: str, result: str) -> None:
    """Print :func:`random_weights_banner` to stderr."""
    import sys

    print(random_weights_banner(networks, result), file=sys.stderr, flush=True)


def checkpoints_root() -> Path:
    """The checkpoints folder: ``$MODITALKER_CHECKPOINTS`` or ``<repo>/checkpoints``."""
    env = os.environ.get("MODITALKER_CHECKPOINTS")
    return Path(env).expanduser() if env else REPO_ROOT / "checkpoints"


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise UserError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def default_path(name: str) -> Path:
    """Default location of asset ``name`` (see :data:`ASSETS`)."""
    return checkpoints_root() / _asset(name).path


def _torch_hub_checkpoints() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing_parts(asset: Asset, path: Path) -> list[str]:
    """What is missing at ``path`` for ``asset`` (empty when present)."""
    if not asset.contents:
        return [] if path.is_file() else [str(path)]
    missing = _missing_parts_in(asset, path) if path.is_dir() else [str(path) + "/"]
    if missing and asset.name == "face_alignment" and not _missing_parts_in(asset, _torch_hub_checkpoints()):
        return []  # face_alignment's own torch-hub cache is an accepted fallback location
    return missing


def _missing_parts_in(asset: Asset, folder: Path) -> list[str]:
    missing = []
    for entry in asset.contents:
        options = entry if isinstance(entry, tuple) else (entry,)
        if not any((folder / o).is_file() for o in options):
            missing.append(str(folder / " or ".join(options)))
    return missing


def asset_present(name: str, path: str | Path | None = None) -> bool:
    """Whether asset ``name`` exists at ``path`` (default location when None)."""
    asset = _asset(name)
    return not _missing_parts(asset, Path(path) if path is not None else default_path(name))


def missing_message(name: str, path: str | Path | None = None) -> str:
    """One line: what is missing, where to get it, and the pointer to the asset check."""
    asset = _asset(name)
    path = Path(path) if path is not None else default_path(name)
    parts = _missing_parts(asset, path) or [str(path)]
    return f"{name}: missing {', '.join(parts)} ({asset.what}); source: {asset.source}; {CHECK_HINT}"


def check_assets(
    names: Iterable[str] | None = None, overrides: Mapping[str, str | Path] | None = None
) -> list[str]:
    """One line per missing asset among ``names`` (all when None); ``overrides`` maps name -> path."""
    overrides = dict(overrides or {})
    unknown = [n for n in list(overrides) + list(names or []) if n not in ASSETS]
    if unknown:
        raise UserError(f"unknown asset(s) {unknown}; known: {', '.join(ASSETS)}")
    lines = []
    for name in names if names is not None else ASSETS:
        path = overrides.get(name)
        if not asset_present(name, path):
            lines.append(missing_message(name, path))
    return lines


def require_asset(name: str, path: str | Path | None = None) -> Path:
    """Return the asset's path, or raise :class:`UserError` naming it, its source and the check."""
    resolved = Path(path) if path is not None else default_path(name)
    if not asset_present(name, resolved):
        raise UserError(missing_message(name, resolved))
    return resolved


def _located(asset: Asset, path: Path) -> Path:
    """Where a folder asset's files are: ``path``, or face_alignment's torch-hub cache fallback."""
    if asset.name == "face_alignment" and (not path.is_dir() or _missing_parts_in(asset, path)):
        return _torch_hub_checkpoints()  # asset_present() accepted it, so the cache holds both files
    return path


def inspect_asset(name: str, path: str | Path | None = None, deep: bool = False) -> list[str]:
    """What is wrong with asset ``name`` at ``path`` (default location when None): one line per missing
    or bad file (empty: present and sound). Content checks: :mod:`moditalker.asset_content`."""
    from moditalker import asset_content as content

    asset = _asset(name)
    path = Path(path) if path is not None else default_path(name)
    if not asset_present(name, path):
        return [missing_message(name, path)]
    if name in content.TORCH_FILES:
        problems = content.check_torch_file(name, path, deep)
    elif name in content.MAT_FIELDS:
        problems = content.check_mat_file(name, path, deep)
    elif name == "hubert":
        problems = content.check_hubert(path, deep)
    elif name == "face_alignment":
        problems = content.check_face_alignment(_located(asset, path), asset.contents, deep)  # type: ignore
    else:
        problems = []
    return [f"{name}: {line}; {_fix_hint(name, path)}" for line in problems]


def _fix_hint(name: str, path: Path) -> str:
    from moditalker.asset_download import DOWNLOAD_URLS, GDRIVE_IDS

    if name in GDRIVE_IDS or name in DOWNLOAD_URLS or name == "hubert":  # the download command fetches it
        return f"remove it and run `python -m moditalker.assets download {name}`"
    return f"replace it (source: {ASSETS[name].source})"


def inspect_assets(
    names: Iterable[str] | None = None,
    overrides: Mapping[str, str | Path] | None = None,
    deep: bool = False,
) -> dict[str, list[str]]:
    """:func:`inspect_asset` for each of ``names`` (all when None): ``{name: problems}``."""
    overrides = dict(overrides or {})
    unknown = [n for n in list(overrides) + list(names or []) if n not in ASSETS]
    if unknown:
        raise UserError(f"unknown asset(s) {unknown}; known: {', '.join(ASSETS)}")
    return {n: inspect_asset(n, overrides.get(n), deep) for n in (names if names is not None else ASSETS)}


def markdown_table(relative: bool = True) -> str:
    """The asset table as Markdown (the body of ``checkpoints/README.md``)."""
    rows = [
        "| name | default path | what | where to get it | licence | used by |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in ASSETS.values():
        path = f"checkpoints/{a.path}" if relative else str(default_path(a.name))
        if a.contents:
            path += "/"
        what = a.what + (" (optional)" if a.optional else "")
        rows.append(f"| `{a.name}` | `{path}` | {what} | {a.source} | {a.licence} | {a.used_by} |")
    return "\n".join(rows) + "\n"


def __getattr__(name: str):
    if name == "main":  # the command line, moditalker.assets_cli
        from moditalker.assets_cli import main

        return main
    # the download code (moditalker.asset_download, imported on first use): its public names
    if not name.startswith("__"):
        from moditalker import asset_download

        if name in asset_download.__all__:
            return getattr(asset_download, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from moditalker.assets_cli import main as _main

    cli_main(_main)
