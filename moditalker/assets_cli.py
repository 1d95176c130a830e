"""``python -m moditalker.assets``: list, check and download the external files of
:mod:`moditalker.assets`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from moditalker.asset_download import GDRIVE_IDS, GROUPS, download_asset, download_gdrive_asset
from moditalker.assets import (
    ASSETS,
    CHECK_HINT,
    _asset,
    asset_present,
    checkpoints_root,
    default_path,
    inspect_assets,
    markdown_table,
)
from moditalker.errors import UserError, cli_main


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set takes name=path, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m moditalker.assets",
        description="List the external files (weights, BFM), check what they hold, download them.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    chk = sub.add_parser(
        "check",
        help="report ok / MISSING / BAD per asset; exit 2 with one line per missing or bad file",
        description="Cheap content checks by default (file type, truncation, the official key/shape layout "
        "of the MoDiTalker checkpoints, the .mat variables, the HuBERT folder); --deep also reads every "
        "byte (CRC) and loads every model.",
    )
    chk.add_argument(
        "--only", nargs="+", default=None, metavar="NAME", help=f"subset of: {', '.join(ASSETS)}"
    )
    chk.add_argument("--set", nargs="+", default=[], metavar="NAME=PATH", help="check another location")
    chk.add_argument("--required", action="store_true", help="skip the optional assets")
    chk.add_argument("--deep", action="store_true", help="read every byte and load the models (slower)")
    tab = sub.add_parser("table", help="print the Markdown table of checkpoints/README.md")
    tab.add_argument(
        "--markdown", action="store_true", help="Markdown (the only format; accepted for clarity)"
    )
    dl = sub.add_parser(
        "download",
        help="fetch assets (needs network): the public weights, or the official MoDiTalker checkpoints",
    )
    dl.add_argument(
        "names",
        nargs="*",
        default=["hubert", "face_alignment", "lpips_vgg16"],
        help="default: hubert face_alignment lpips_vgg16; 'moditalker' = atom autoencoder_rgb "
        "autoencoder_motion (Google Drive); the evaluation weights: lpips_alexnet fid_inception syncnet",
    )
    dl.add_argument(
        "--url", default=None, help="fetch the one named file from this URL (a mirror, a Drive link)"
    )
    dl.add_argument(
        "--accept-bfm-licence",
        "--accept-bfm-license",
        dest="accept_bfm_licence",
        action="store_true",
        help="you accept the Basel Face Model licence (non-commercial research); needed for bfm_front",
    )
    dl.add_argument("--retries", type=int, default=3, help="Google-Drive downloads: retries per file")
    args = ap.parse_args(argv)

    if args.command == "download":
        names = [n for name in args.names for n in GROUPS.get(name, (name,))]
        for name in names:
            _asset(name)
        if args.url is not None and len(names) != 1:
            raise UserError(f"--url names one file; got {len(names)} assets ({' '.join(names)})")
        for name in names:
            if name in GDRIVE_IDS or args.url is not None or name == "bfm_front":
                path = download_gdrive_asset(
                    name, url=args.url, retries=args.retries, accept_bfm_licence=args.accept_bfm_licence
                )
            else:
                path = download_asset(name)
            print(f"{name}: {path}")
        return 0

    if args.command == "table":
        print(markdown_table(), end="")
        return 0
    overrides = _parse_sets(args.set)
    names = (
        args.only
        if args.only is not None
        else [n for n in ASSETS if not (args.required and ASSETS[n].optional)]
    )
    print(f"checkpoints folder: {checkpoints_root()}")
    report = inspect_assets(names, overrides, deep=args.deep)
    for name in names:
        path = Path(overrides[name]) if name in overrides else default_path(name)
        problems = report[name]
        status = "ok     " if not problems else "MISSING" if not asset_present(name, path) else "BAD    "
        print(f"  {status} {name:<20} {path}", flush=True)
    lines = [line for name in names for line in report[name]]
    if lines:
        print(f"\n{len(lines)} missing or bad:")
        for line in lines:
            print(f"  - {line.removesuffix('; ' + CHECK_HINT)}")  # no "run the check" inside the check
        raise SystemExit(2)
    print("all requested assets present" + (" and sound (deep check)" if args.deep else " and sound"))
    return 0


if __name__ == "__main__":
    cli_main(main)
