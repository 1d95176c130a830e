"""The latent cache's records of the whole build: ``build.json`` (the settings it was built with) and
``manifest.json`` (shapes, splits, videos, latent spread), written by :mod:`MToV.cache_latents` once every
video is built, checked on every rerun and written again when damaged or out of date."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from moditalker.errors import UserError
from moditalker.fileio import atomic_write_text
from moditalker.training.bad_items import allowed_bad_items
from MToV.latents import (
    BUILD,
    FORMAT,
    MANIFEST,
    MIN_SPREAD,
    bytes_per_window,
    json_problem,
    latent_spread,
    manifest_problem,
    video_problem,
)

__all__ = ["make_manifest", "manifest_mismatch", "recorded_settings", "write_manifest"]


def recorded_settings(out: Path, settings: dict) -> dict:
    """The settings ``out``'s cache was built with: its ``build.json``; when that is damaged, the
    settings its manifest records (``build.json`` is written again from them), else a one-line error."""
    build = out / BUILD
    old, problem = json_problem(build)
    if problem is None:
        return old
    manifest, damage = json_problem(out / MANIFEST, manifest_problem)
    if damage is not None or manifest.get("format") != FORMAT:
        raise UserError(
            f"{build} {problem}, and no intact {MANIFEST} records the settings of the latent cache in "
            f"{out}; pass --overwrite to rebuild it, or choose another --out"
        )
    old = {k: manifest.get(k) for k in settings}
    print(f"warning: {build} {problem}; writing it again from {MANIFEST}", file=sys.stderr)
    if build.is_dir() and not build.is_symlink():
        shutil.rmtree(build)
    atomic_write_text(build, json.dumps(old, indent=1))
    return old


def make_manifest(
    out: Path, settings: dict, videos: list[dict], splits: dict, shapes: dict
) -> tuple[dict | None, dict[str, str]]:
    """The manifest of the built videos (without ``latent_spread``; None while some video is neither
    built nor unreadable) and the unreadable videos with why."""
    done, bad = {}, {}
    for v in videos:
        meta = out / "videos" / v["id"] / "video.json"
        marker = out / "videos" / f"{v['id']}.unreadable"
        if meta.is_file():
            record, problem = json_problem(meta, video_problem)
            if problem is not None and not meta.is_file():  # removed by its shard to build it again
                return None, bad
            if problem is not None:  # another shard's video (this shard checked its own)
                raise UserError(f"{meta} {problem}; rerun the build of every shard to build it again")
            done[v["id"]] = record
        elif marker.is_file():
            bad[v["id"]] = marker.read_text().strip()
        else:
            return None, bad
    manifest = {
        **settings,
        "shapes": {k: list(s) for k, s in shapes.items()},
        "bytes_per_window": bytes_per_window(shapes, settings["dtype"]),
        "windows": sum(d["windows"] for d in done.values()),
        "splits": {k: [i for i in ids if i in done] for k, ids in splits.items()},
        "unreadable": bad,
        "videos": {k: {"frames": d["frames"], "windows": d["windows"]} for k, d in done.items()},
    }
    return manifest, bad


def manifest_mismatch(path: Path, manifest: dict) -> str | None:
    """What is wrong with the ``manifest.json`` at ``path`` given what it should say (None: nothing)."""
    if not path.exists() and not path.is_symlink():
        return "is missing"
    old, problem = json_problem(path, manifest_problem)
    if problem is not None:
        return problem
    if not isinstance(old.get("latent_spread"), dict):
        return "is damaged: its latent_spread is not a record"
    old = {k: v for k, v in old.items() if k != "latent_spread"}
    keys = [k for k in sorted(set(old) | set(manifest)) if old.get(k) != manifest.get(k)]
    return f"does not match the built videos ({', '.join(keys)} differ)" if keys else None


def write_manifest(
    out: Path, settings: dict, videos: list[dict], splits: dict, shapes: dict, max_bad: float
) -> bool:
    """Write ``manifest.json`` once every video is built (or unreadable), unless the one there says
    what it should (a damaged one or one that does not match the built videos is written again);
    False while some videos are missing."""
    manifest, bad = make_manifest(out, settings, videos, splits, shapes)
    if manifest is None:
        return False
    path = out / MANIFEST
    problem = manifest_mismatch(path, manifest)
    if problem is None:
        return True
    if problem != "is missing":
        print(f"warning: {path} {problem}; writing it again", file=sys.stderr)
    allowed = allowed_bad_items(max_bad, len(videos))
    if len(bad) > allowed:
        first = "; ".join(f"{k}: {m}" for k, m in list(bad.items())[:2])
        raise UserError(
            f"{len(bad)} videos are unreadable, more than data.max_bad_items={max_bad} allows "
            f"({allowed}): {first}; fix them and rerun (built videos are kept)"
        )
    train = [out / "videos" / v for v in manifest["splits"].get("train", [])][:32]
    manifest["latent_spread"] = {k: latent_spread(train, settings["dtype"], k) for k in ("z", "z_l")}
    for kind, what in (("z", "RGB"), ("z_l", "landmark")):
        stats = manifest["latent_spread"][kind]
        spread = stats["spread_median"]
        if spread is not None and not np.isfinite(spread):  # NaN compares False with everything
            print(
                f"warning: the {what} autoencoder's cached latents are not finite (NaN or Inf); a UNet "
                "cannot train on them. Rebuild the cache from a sound checkpoint (--overwrite)",
                file=sys.stderr,
            )
        elif spread is not None and spread < MIN_SPREAD:
            print(
                f"warning: the {what} autoencoder's latent hardly varies between training windows (median "
                f"spread {spread:.1e}, {stats['saturated']:.0%} of the values "
                "beyond 0.99: its tanh is saturated); a UNet trained on it cannot make the mouth follow "
                "the landmarks. Retrain that autoencoder with loss.latent_weight (docs/training.md)",
                file=sys.stderr,
            )
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    atomic_write_text(path, json.dumps(manifest, indent=1))
    return True
