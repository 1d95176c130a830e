"""YAML configs (OmegaConf) with ``key=value`` command-line overrides; resolved configs are saved."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moditalker.errors import UserError, describe
from moditalker.fileio import atomic_write_text


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    defaults: dict | None = None,
    strict: bool = False,
) -> DictConfig:
    """Load ``defaults`` <- YAML at ``path`` <- ``key=value`` overrides (dotted keys allowed).

    ``strict``: a key that ``defaults`` does not have (a typo such as ``train.max_stpes=5``, which
    would otherwise run with the default and save the typo in the run's config) is a UserError naming
    it and the closest known key, and so is a value of another kind than its default's (see
    :func:`_check_against_defaults`). Below a default of ``None`` any mapping is accepted.
    """
    cfg = OmegaConf.create(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except (OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:
            raise UserError(f"cannot parse config {path}: {_yaml_error(exc)}") from exc
        if not isinstance(loaded, DictConfig):
            raise UserError(f"config {path} must be a YAML mapping (key: value), not a list")
        if not len(loaded) and defaults:  # an empty (or cut short) file: every setting its default
            print(f"warning: config {path} is empty; every setting takes its default", file=sys.stderr)
        if defaults and len(loaded) and not set(loaded) & set(defaults):
            raise UserError(
                f"{path} is not a config for this command: none of its top-level keys "
                f"{sorted(map(str, loaded))[:6]} is one of {sorted(defaults)}"
            )
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except (OmegaConfBaseException, ValueError, TypeError, yaml.YAMLError) as exc:
            raise UserError(f"cannot parse config {path}: {_yaml_error(exc)}") from exc
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"overrides must look like key=value, got {bad}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, TypeError, yaml.YAMLError) as exc:
        culprit = next((o for o in overrides if not _parses(o)), None)
        where = f" {culprit!r}" if culprit is not None else ""
        raise UserError(f"bad override{where}: {_yaml_error(exc)}") from exc
    if strict and defaults:
        _check_against_defaults(cfg, defaults, f" (in {path} or the overrides)" if path is not None else "")
    return cfg


def did_you_mean(name: str, names: list[str]) -> str:
    """``"; did you mean X?"`` naming the known name closest to a mistyped ``name``; "" when none is close."""
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _check_against_defaults(cfg: DictConfig, defaults: dict | DictConfig, where: str = "") -> None:
    """``strict`` configs, in one walk beside ``defaults``: a key they do not have is a UserError naming
    it and the closest known key (below a default of None any key is accepted); and each setting must be
    of the kind its default is: a section (a mapping default) a mapping, a number a number (not text,
    not NaN), a yes/no a boolean, 0 or 1, null or text (a switch may also name a mode:
    ``train.amp=bf16``); a default of None, a list or text takes anything.
    (``mtov: 5`` or ``lr: abc`` ran on into a traceback, ``ema_decay: .nan`` into NaN weights.)"""
    import math

    known = OmegaConf.to_container(OmegaConf.create(defaults)) if not isinstance(defaults, dict) else defaults

    def walk(node: object, ref: dict, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            name = f"{prefix}{key}"
            if key not in ref:
                names = [f"{prefix}{k}" for k in ref]
                hint = did_you_mean(name, names) or f"; known here: {', '.join(names[:12])}"
                raise UserError(f"unknown setting {name}{hint}")
            default = ref[key]
            if default is None or (isinstance(value, str) and value.startswith("${")):  # resolved later
                continue
            if isinstance(default, dict):
                if default and not isinstance(value, dict):
                    raise UserError(f"{name} must be a section (key: value lines){where}, got {value!r}")
                walk(value, default, f"{name}.")
            elif isinstance(default, bool):  # text too: some switches also name a mode (train.amp=bf16)
                if not (value is None or isinstance(value, (bool, str)) or value in (0, 1)):
                    raise UserError(f"{name} must be true or false{where}, got {value!r}")
            elif isinstance(default, (int, float)) and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UserError(f"{name} must be a number{where}, got {value!r}")
                if isinstance(value, float) and math.isnan(value):
                    raise UserError(f"{name} must be a number{where}, got NaN")

    walk(OmegaConf.to_container(cfg, resolve=False), known, "")


def _parses(override: str) -> bool:
    try:
        OmegaConf.from_dotlist([override])
    except (OmegaConfBaseException, yaml.YAMLError):
        return False
    return True


def _yaml_error(exc: Exception) -> str:
    """A YAML syntax error in one line, with its position when the parser gives one."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return describe(exc)


def save_config(cfg: DictConfig | dict, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
