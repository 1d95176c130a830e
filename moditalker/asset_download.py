"""Downloads of the external files named in :mod:`moditalker.assets`: the public ones from their own
hosts (or a mirror, ``$MODITALKER_MIRROR``) and the official MoDiTalker checkpoints from Google Drive with
gdown. Used through ``python -m moditalker.assets download``; every name here is also reachable as
``moditalker.assets.<name>``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moditalker.assets import _asset, asset_present, default_path, inspect_asset
from moditalker.errors import UserError, describe

#: the names moditalker.assets forwards here
__all__ = [
    "DOWNLOAD_URLS",
    "HUBERT_HUB_ID",
    "MIRROR_ENV",
    "mirrored",
    "download_asset",
    "GDRIVE_IDS",
    "GROUPS",
    "GDRIVE_URL_ENV",
    "GDRIVE_URL",
    "BFM_REGISTRATION",
    "gdrive_url",
    "download_gdrive_asset",
]

DOWNLOAD_URLS: dict[str, dict[str, str]] = {
    "face_alignment": {
        "2DFAN4-11f355bf06.pth.tar": "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",
        "s3fd-619a316812.pth": "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth",
    },
    "lpips_vgg16": {"": "https://download.pytorch.org/models/vgg16-397923af.pth"},
    "lpips_alexnet": {"": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"},
    "fid_inception": {
        "": "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth"
    },
    "syncnet": {"": "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"},
}
HUBERT_HUB_ID = "facebook/hubert-large-ls960-ft"
MIRROR_ENV = "MODITALKER_MIRROR"


def mirrored(url: str) -> str:
    """``url`` on the mirror ``$MODITALKER_MIRROR`` (``MIRROR/<host>/<path>``), or ``url`` itself."""
    mirror = os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{url.split('://', 1)[1]}" if mirror else url


@contextmanager
def _remove_new_folders_on_error(folder: Path) -> Iterator[None]:
    """Create ``folder`` (and missing parents); when the body fails, remove those of them it left empty
    (a failed offline download leaves no empty folder behind; one holding a partial file stays)."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for p in created:
            try:
                p.rmdir()
            except OSError:  # not empty: a partial download kept for resuming
                break
        raise


def download_asset(name: str, path: str | Path | None = None) -> Path:
    """Fetch ``hubert`` or one of :data:`DOWNLOAD_URLS` (``face_alignment``, ``lpips_vgg16`` and the
    evaluation weights ``lpips_alexnet``, ``fid_inception``, ``syncnet``) to ``path`` (default location);
    the official MoDiTalker checkpoints (:data:`GDRIVE_IDS`) go through :func:`download_gdrive_asset`.

    Needs network access; files are written atomically, existing complete assets are left alone, and a
    failed download leaves no empty folder behind.
    """
    from moditalker.fileio import atomic_path

    asset = _asset(name)
    if name in GDRIVE_IDS:
        return download_gdrive_asset(name, path)
    dest = Path(path) if path is not None else default_path(name)
    if name == "hubert":
        if asset_present(name, dest):
            return dest
        from transformers import AutoFeatureExtractor, HubertModel

        try:
            model = HubertModel.from_pretrained(HUBERT_HUB_ID)
            extractor = AutoFeatureExtractor.from_pretrained(HUBERT_HUB_ID)
        except OSError as exc:
            raise UserError(f"cannot download {HUBERT_HUB_ID} (network?): {describe(exc)}") from exc
        if dest.exists():  # a folder that is not a complete HuBERT: never removed without asking
            raise UserError(
                f"{dest} exists but is not a complete HuBERT folder; move it away and run "
                f"`python -m moditalker.assets download hubert` again"
            )
        tmp = dest.with_name(f".{dest.name}.partial")
        if tmp.exists():  # what an earlier, interrupted attempt left
            shutil.rmtree(tmp)
        with _remove_new_folders_on_error(dest.parent):
            model.save_pretrained(tmp)
            extractor.save_pretrained(tmp)
        tmp.rename(dest)
        return dest
    if name not in DOWNLOAD_URLS:
        if name == "bfm_front":
            raise UserError(_bfm_route(name))
        raise UserError(
            f"{name} cannot be downloaded automatically; source: {asset.source} (with a direct link: "
            f"`python -m moditalker.assets download {name} --url LINK`)"
        )
    from torch.hub import download_url_to_file

    from moditalker.asset_content import sniff

    for file_name, url in DOWNLOAD_URLS[name].items():
        url = mirrored(url)
        target = dest / file_name if file_name else dest
        if target.is_file():
            problem = sniff(target)[1]
            if not problem:
                continue
            raise UserError(f"{target} is {problem}; remove it and run the download again")
        try:
            with _remove_new_folders_on_error(target.parent), atomic_path(target) as tmp:
                download_url_to_file(url, str(tmp), progress=True)
                problem = sniff(tmp)[1]
                if problem:  # checked before it takes the final name: nothing is left at the target
                    raise UserError(f"{url} gave {problem}; nothing was written at {target}")
        except OSError as exc:
            raise UserError(f"cannot download {url} (network?): {describe(exc)}") from exc
    return dest


# The official checkpoints: the Google-Drive files the MoDiTalker README links.
GDRIVE_IDS: dict[str, str] = {
    "atom": "1nxKqaScFIGuNoK5Y5Jq4zeWxJ55sUw_E",
    "autoencoder_motion": "1b9s5TbCaj5hz-luw7abgLYOF2Ph3jKrv",
    "autoencoder_rgb": "1KQ7XKl5HLP79Ri7A33VHfn7Tvnwz3v9o",
}
#: names that stand for several assets on the download command line
GROUPS: dict[str, tuple[str, ...]] = {"moditalker": ("atom", "autoencoder_rgb", "autoencoder_motion")}
GDRIVE_URL_ENV = "MODITALKER_GDRIVE_URL"
GDRIVE_URL = "https://drive.google.com/uc?id={id}"
BFM_REGISTRATION = (
    "register at https://faces.dmi.unibas.ch/bfm/main.php?nav=1-2&id=downloads (Basel Face Model 2009, "
    "01_MorphableModel.mat), get Exp_Pca.bin (Guo et al., CoarseData) and convert both with "
    "Deep3DFaceRecon_pytorch's BFM transfer script (github.com/sicxu/Deep3DFaceRecon_pytorch, "
    "'Prepare prerequisite models')"
)


def _bfm_route(name: str) -> str:
    dest = default_path(name)
    return (
        f"{name} ({dest.name}) is under the Basel Face Model licence (non-commercial research, "
        f"registration required): {BFM_REGISTRATION}, and place it at {dest}. The converted copy the "
        "MoDiTalker README links has no file id recorded here; to fetch it anyway, accept the BFM licence "
        f"terms and give its link: `python -m moditalker.assets download {name} --accept-bfm-licence "
        "--url LINK`"
    )


def gdrive_url(file_id: str) -> str:
    """The URL gdown fetches for a Drive file id (``$MODITALKER_GDRIVE_URL`` template, ``{id}`` filled)."""
    template = os.environ.get(GDRIVE_URL_ENV) or GDRIVE_URL
    if "{id}" not in template:
        raise UserError(f"{GDRIVE_URL_ENV}={template!r} must contain {{id}}")
    return template.replace("{id}", file_id)


def _content_problems(name: str, path: Path) -> list[str]:
    from moditalker import asset_content as content

    if name in content.MAT_FIELDS:
        return content.check_mat_file(name, path, deep=True)
    return content.check_torch_file(name, path, deep=True)


def download_gdrive_asset(
    name: str,
    path: str | Path | None = None,
    url: str | None = None,
    retries: int = 3,
    accept_bfm_licence: bool = False,
    quiet: bool = False,
) -> Path:
    """Fetch one official checkpoint (:data:`GDRIVE_IDS`; or any single-file asset from ``url``) with
    gdown into ``.<name>.download`` beside ``path`` (resumed from gdown's partial ``.part`` file there
    when an earlier run was interrupted), check it like ``assets check --deep`` and rename it to
    ``path``. A failed or wrong download leaves nothing at ``path`` and raises a :class:`UserError`
    saying what to do. An existing sound file is kept; an existing bad one is refused (remove it)."""
    asset = _asset(name)
    dest = Path(path) if path is not None else default_path(name)
    if asset.contents:
        raise UserError(
            f"{name} is a folder of files; `python -m moditalker.assets download {name}` fetches it"
        )
    if name == "bfm_front" and not accept_bfm_licence:
        raise UserError(_bfm_route(name))
    if url is None:
        if name not in GDRIVE_IDS:
            if name == "bfm_front":
                raise UserError(_bfm_route(name))
            raise UserError(f"{name} has no known download link; source: {asset.source} (or pass --url)")
        url = gdrive_url(GDRIVE_IDS[name])
    browser = f"https://drive.google.com/file/d/{GDRIVE_IDS[name]}/view" if name in GDRIVE_IDS else url
    by_hand = (
        f"or download it in a browser from {browser} and place it at {dest}, then run "
        f"`python -m moditalker.assets check --only {name}`"
    )
    if dest.exists():
        problems = inspect_asset(name, dest, deep=True)
        if problems:
            raise UserError(f"{problems[0]} (it is kept: nothing is overwritten)")
        if not quiet:
            print(f"{name}: {dest} is already here and sound", flush=True)
        return dest

    import gdown

    staging = dest.with_name(f".{dest.name}.download")
    with _remove_new_folders_on_error(dest.parent):
        try:
            gdown.download(
                url, str(staging), quiet=quiet, resume=True, retries=retries, timeout=60, use_cookies=False
            )
        except Exception as exc:  # noqa: BLE001 - requests, gdown and OS errors alike
            partial = list(dest.parent.glob(f"{staging.name}*.part"))
            keep = (
                f"the {partial[0].stat().st_size:,} bytes received are kept in {partial[0]}: run the same "
                "command again to resume, "
                if partial and partial[0].stat().st_size
                else "run the same command again later, "
            )
            raise UserError(
                f"{name}: cannot download {url}: {describe(exc)}; nothing was saved at {dest}; "
                f"{keep}{by_hand}"
            ) from exc
    problems = _content_problems(name, staging)
    if problems:
        staging.unlink()
        what = problems[0].replace(str(staging), "the downloaded file")
        raise UserError(
            f"{name}: the download from {url} is not the expected file: {what}; it was deleted and nothing "
            f"was saved at {dest}; try again later (Google Drive limits how often a file can be "
            f"downloaded), {by_hand}"
        )
    os.replace(staging, dest)
    if not quiet:
        print(f"{name}: {dest} (checked)", flush=True)
    return dest
