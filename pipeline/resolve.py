"""The one way a run's config is made, for the command line, the batch mode, the web page and the
evaluation protocols: the schema's defaults (:mod:`pipeline.settings`) <- the YAML file <- flags <-
``key=value`` overrides."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moditalker.config import load_config
from moditalker.errors import UserError
from moditalker.fileio import REPO_ROOT, same_file
from pipeline.settings import DEFAULTS, FLAGS, SETTINGS, inherit_settings

__all__ = ["DEFAULT_CONFIG", "resolve", "resolve_args"]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "inference.yaml"


def resolve(
    config_path: str | Path | None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> DictConfig:
    """defaults <- YAML (``config_path``; None: ``configs/inference.yaml`` when it exists) <- ``flags``
    <- ``overrides`` (``key=value`` strings), then the null settings that inherit another's value.

    ``flags``: ``{name: value}``, a name being a command-line flag without ``--`` (:data:`FLAGS`:
    ``steps``) or a setting's key (``mtov.start_ratio``); a None value leaves the setting as it is. A
    value is set as it is (a path such as ``it's a.wav`` or ``123`` is not parsed as YAML); a whole
    float for an integer setting (what a web number field sends) is taken as the integer."""
    from omegaconf.errors import OmegaConfBaseException

    path: str | Path | None = config_path
    if config_path is None:
        path = DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None
    cfg = load_config(path, (), defaults=DEFAULTS)
    for name, value in (flags or {}).items():
        if name not in FLAGS and name not in SETTINGS:
            raise KeyError(f"{name} is neither a flag nor a setting")
        if value is None:
            continue
        key = FLAGS.get(name, name)
        if isinstance(value, float) and value.is_integer() and SETTINGS[key].type is int:
            value = int(value)
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as exc:
            where = f"--{name}" if name in FLAGS else name
            raise UserError(f"cannot set {key} from {where}: {str(exc).splitlines()[0]}") from exc
    cfg = load_config(None, list(overrides), defaults=cfg)
    inherit_settings(cfg)  # null atom.seed / mtov.seed: the top-level seed
    return cfg


def resolve_args(args: argparse.Namespace) -> DictConfig:
    """:func:`resolve` of parsed command-line arguments (``--config``, the flags, the overrides)."""
    flags = {name: getattr(args, name, None) for name in FLAGS}
    cfg = resolve(args.config, flags, getattr(args, "overrides", None) or ())
    if args.config and cfg.get("out") and same_file(Path(cfg.out).with_suffix(".yaml"), args.config):
        # the run writes its resolved config there: an input is never an output
        raise UserError(
            f"--config {args.config} is where this run writes its settings ({Path(cfg.out).stem}.yaml "
            "beside --out); copy it elsewhere or choose another --out"
        )
    return cfg
