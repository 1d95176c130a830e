"""The one schema of the settings of ``python -m pipeline.inference``.

Every setting is defined once, as a field of the dataclasses below: its type (``X | None`` when it
may be null), default, range or choices (:class:`Check`), help, and as field metadata the
command-line flag that sets it (if any) and the stages whose cache key holds it. Everything else is
derived from these classes:

* :data:`DEFAULTS`: the nested dict of defaults (``configs/inference.yaml`` spells the same tree out
  with comments; a test keeps the two equal);
* :func:`check_settings`: unknown keys, wrong types and out-of-range values of a loaded config
  (YAML + flags + ``key=value`` overrides) -> one-line :class:`UserError`;
* :data:`FLAGS` / :func:`flag_settings`: the flag -> key mapping (and the argparse types and help) of
  :func:`pipeline.cli.build_parser` and :func:`pipeline.resolve.resolve`;
* :func:`stage_settings`: the settings part of a stage's cache key (:mod:`pipeline.cache`);
* :func:`inherit_settings`: null settings that take another's value (``atom.seed`` <- ``seed``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from moditalker.config import did_you_mean
from moditalker.errors import UserError
from moditalker.fileio import REPO_ROOT, file_sha256

__all__ = [
    "Check",
    "Setting",
    "InferenceSettings",
    "SETTINGS",
    "FREE_FORM",
    "DEFAULTS",
    "FLAGS",
    "X264_PRESETS",
    "IGNORED",
    "flag_settings",
    "check_settings",
    "inherit_settings",
    "stage_settings",
    "stage_config",
    "config_identity",
]


# ----------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    """A constraint on a (well-typed, non-null) value; ``wanted`` ends the message "NAME must be ..."."""

    test: Callable[[Any], bool]
    wanted: str


def at_least(lo: float) -> Check:
    return Check(lambda v: v >= lo, f">= {lo}")


def int_range(lo: int, hi: int, text: str | None = None) -> Check:
    return Check(lambda v: lo <= v <= hi, f"in {text or f'{lo}..{hi}'}")


def closed(lo: float, hi: float) -> Check:
    return Check(lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


def open_interval(lo: float, hi: float) -> Check:
    return Check(lambda v: lo < v < hi, f"in ({lo}, {hi})")


def one_of(choices: Sequence[str], wanted: str | None = None) -> Check:
    return Check(lambda v: v in choices, wanted or f"one of {', '.join(choices)}")


SEED = int_range(0, 2**63 - 1, "0..2**63-1")
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)


def setting(
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    flag: str | None = None,
    exclusive: str | None = None,
    stages: tuple[str, ...] | None = None,
    inherit: str | None = None,
    free_form: bool = False,
    label: str | None = None,
) -> Any:
    """A leaf of the schema.

    ``flag``: the command-line flag (``--NAME``) that sets it; ``exclusive``: flags sharing this
    name are mutually exclusive. ``stages``: the stages whose cache key holds the setting; None
    means the stage named like its section (``atom.steps`` -> ``atom``; none for a top-level
    setting), ``()`` none (the key then holds what the stage derives from it). ``inherit``: a null
    value takes the value of that setting when the config is resolved. ``free_form``: a YAML path or
    an inline mapping, checked by the loader it is passed to. ``label``: its name as a field of the
    web page (the settings the page offers have one).
    """
    meta = dict(help=help, check=check, flag=flag, exclusive=exclusive, stages=stages, inherit=inherit)
    return field(default=default, metadata={**meta, "free_form": free_form, "label": label})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


# ----------------------------------------------------------------------------- the schema
@dataclass
class AssetSettings:
    """Checkpoint locations; null = the default location of :mod:`moditalker.assets` (checkpoints/...)."""

    atom: str | None = setting(None, "AToM checkpoint (checkpoints/atom.pt)")
    autoencoder_rgb: str | None = setting(None, "MToV RGB autoencoder (checkpoints/autoencoder_rgb.pth)")
    autoencoder_motion: str | None = setting(
        None, "MToV landmark autoencoder (checkpoints/autoencoder_motion.pth)"
    )
    diffusion_model: str | None = setting(None, "MToV diffusion UNet (checkpoints/diffusion_model.pth)")
    bfm_dir: str | None = setting(None, "folder of BFM_model_front.mat + similarity_Lm3D_all.mat")
    deep3d: str | None = setting(None, "Deep3DFaceRecon weights (checkpoints/deep3d/epoch_20.pth)")
    hubert: str | None = setting(None, "HuBERT folder (checkpoints/hubert-large-ls960-ft/)")
    face_alignment: str | None = setting(None, "FAN + s3fd weights (else face_alignment's torch-hub cache)")


@dataclass
class HubertSettings:
    batch_size: int = setting(
        4,
        "20 s chunks per HuBERT forward pass",
        check=at_least(1),
        stages=(),  # batching does not change the features
    )
    random_hidden_size: int | None = setting(
        None,
        "random HuBERT feature size (--random_weights); null: AToM's cond_feature_dim",
        check=Check(lambda v: v >= 4 and v % 4 == 0, "a positive multiple of 4"),
        stages=(),  # the hubert key holds the size used in the model identity
    )


@dataclass
class ReferenceSettings:
    max_frames: int | None = setting(
        None,
        "cap on reference frames read (null: as many as the audio needs)",
        check=at_least(1),
        stages=(),  # the reference key holds the number of frames actually read
    )


@dataclass
class AtomSettings:
    config: Any = setting(
        None, "model config passed to AToM.inference.load_atom (null: official sizes)", free_form=True
    )
    ema: bool = setting(False, "load the EMA weights (the original loads model_state_dict)")
    steps: int = setting(50, "AToM DDIM steps", check=at_least(1), flag="steps", label="AToM steps")
    eta: float = setting(1.0, "AToM DDIM eta (1 = stochastic, as the original)", check=closed(0, 1))
    guidance_weight: float = setting(
        2.0, "AToM classifier-free guidance weight", flag="guidance", label="AToM guidance"
    )
    seed: int | None = setting(
        None, "AToM sampler seed (null: the top-level seed)", check=SEED, inherit="seed"
    )


@dataclass
class MtovSettings:
    config: Any = setting(
        None, "model config passed to MToV.loading.load_mtov (null: official sizes)", free_form=True
    )
    batch_size: int = setting(
        4, "MToV 16-frame clips per batch", check=at_least(1), flag="batch_size", label="MToV clips per batch"
    )
    start_ratio: float = setting(
        0.25,
        "noised start from the reference latent at t = 1000 * start_ratio",
        check=open_interval(0, 1),
        label="MToV start ratio",
    )
    sampling_timesteps: int = setting(
        100,
        "MToV DDIM schedule length",
        check=at_least(1),
        flag="mtov_steps",
        label="MToV steps (schedule length)",
    )
    use_last_as_reference: bool = setting(False, "reference xy-plane from the previous clip's last frame")
    precision: str = setting(
        "auto",
        "auto = bf16 autocast of the autoencoders on GPUs; on the CPU what was measured >= 1.15x faster "
        "than fp32 there (int8/bf16 autoencoders, int8 UNet), else fp32; "
        "bf16; int8 (CPU: autoencoders' linear layers, UNet's convolutions); fp32 (exact)",
        check=one_of(("auto", "bf16", "fp32", "int8")),
    )
    calibration_file: str | None = setting(
        None,
        "JSON file keeping what precision auto measured on this CPU (null: precision_calibration.json in "
        "$MODITALKER_CACHE_DIR, else $XDG_CACHE_HOME/moditalker, else ~/.cache/moditalker)",
        flag="calibration_file",
        stages=(),  # the mtov key holds the arithmetic chosen
    )
    recalibrate: bool = setting(
        False, "precision auto on the CPU: time the precisions again", flag="recalibrate", stages=()
    )
    seed: int | None = setting(
        None, "MToV sampler seed (null: the top-level seed)", check=SEED, inherit="seed"
    )


@dataclass
class OutputSettings:
    crf: int = setting(18, "H.264 quality (lower = better/larger)", check=int_range(0, 51))
    preset: str = setting(
        "medium",
        "x264 speed preset",
        check=one_of(X264_PRESETS, f"an x264 preset ({', '.join(X264_PRESETS)})"),
    )


@dataclass
class InferenceSettings:
    """Every setting of the pipeline, in the order of ``configs/inference.yaml``."""

    audio: str | None = setting(None, "speech: wav/flac/mp3/m4a or a video with an audio track", flag="audio")
    ref_video: str | None = setting(
        None, "reference video: identity, head pose and background", flag="ref_video", exclusive="reference"
    )
    ref_image: str | None = setting(
        None, "a single reference photo instead (static pose)", flag="ref_image", exclusive="reference"
    )
    out: str | None = setting(None, "output .mp4 (H.264 25 fps 256x256 + AAC)", flag="out")
    work_dir: str | None = setting(
        None, "cache folder of every stage (null: <out folder>/<out stem>_work)", flag="work_dir"
    )
    ref_frame: int = setting(
        0,
        "frame giving the reference landmark",
        check=at_least(0),
        flag="ref_frame",
        stages=("atom", "mtov"),
    )
    device: str = setting("auto", "auto|cpu|cuda|cuda:N", flag="device")
    seed: int = setting(0, "seed of both diffusion samplers", check=SEED, flag="seed", label="Seed")
    size: int = setting(
        256,
        "MToV resolution (the official models are 256x256)",
        check=at_least(32),
        stages=("reference", "align"),
    )
    random_weights: bool = setting(
        False,
        "random networks + synthetic BFM: exercises the pipeline without the licensed assets",
        flag="random_weights",
    )
    preview: bool = setting(False, "also write OUT_preview.mp4", flag="preview")
    overwrite: bool = setting(False, "replace an existing output", flag="overwrite")
    clean_work: bool = setting(
        False, "remove the work folder (the stage cache) after a successful run", flag="clean_work"
    )
    min_audio_seconds: float = setting(0.5, "shortest audio accepted (seconds)", check=at_least(0))
    start: float = setting(
        0.0,
        "render the audio from this second on (a part of a long input, e.g. a preview)",
        check=at_least(0),
        flag="start",
        stages=(),  # the hubert key holds the samples cut, only when the audio is cut
    )
    duration: float | None = setting(
        None,
        "render this many seconds of the audio from --start (null: to the end)",
        check=Check(lambda v: v > 0, "> 0"),
        flag="duration",
        stages=(),  # as start
    )
    assets: AssetSettings = section(AssetSettings, "checkpoint locations")
    hubert: HubertSettings = section(HubertSettings, "HuBERT features")
    reference: ReferenceSettings = section(ReferenceSettings, "reference frames")
    atom: AtomSettings = section(AtomSettings, "AToM: audio -> frontal 3D landmarks")
    mtov: MtovSettings = section(MtovSettings, "MToV: landmarks -> video frames")
    output: OutputSettings = section(OutputSettings, "the mp4 writer")


# ----------------------------------------------------------------------------- derived tables
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Setting:
    """One leaf of the schema, as derived from its dataclass field."""

    key: str  # dotted: "atom.steps"
    type: type | None  # int, float, bool, str; None for a free-form setting
    nullable: bool
    default: Any
    help: str
    check: Check | None
    flag: str | None
    exclusive: str | None
    stages: tuple[str, ...]
    inherit: str | None
    free_form: bool
    label: str | None  # its field on the web page, if the page offers it

    @property
    def name(self) -> str:
        return self.key.rsplit(".", 1)[-1]

    @property
    def kind(self) -> str:
        return _KINDS[self.type] if self.type is not None else "a YAML path or a mapping"

    def validate(self, value: Any) -> None:
        """UserError (one line) unless ``value`` (as given; its type is OmegaConf's to check, in
        :func:`check_settings`) is non-null or nullable and in range. OmegaConf would take 3 for
        ``true`` and for ``"3"``: a bool or string setting is given a bool or a string."""
        name = self.key
        if self.free_form:
            if value is not None and not isinstance(value, str | dict):
                raise UserError(f"{name} must be a YAML path or a mapping, got {value!r}")
            return
        if value is None:
            if self.nullable:
                return
            raise UserError(f"{name} must be {self.kind}, got null")
        if self.type in (bool, str) and not isinstance(value, self.type):
            raise UserError(f"{name} must be {self.kind}, got {value!r}")
        if self.type is float and not math.isfinite(self.typed(value)):
            raise UserError(f"{name} must be a finite number, got {value}")
        if self.check is not None and not self.check.test(self.typed(value)):
            raise UserError(f"{name} must be {self.check.wanted}, got {value!r}")

    def typed(self, value: Any) -> Any:
        """``value`` as this setting's type (an integer given for a float setting becomes a float)."""
        return value if value is None or self.type is None else self.type(value)


def _walk(cls: type, prefix: str = "") -> Iterator[Setting]:
    """The leaves of a schema dataclass in field order: the type from the annotation (``int``,
    ``int | None``: nullable; ``Any``: free form), everything else from the field's metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            yield from _walk(hint, f"{key}.")
            continue
        args = typing.get_args(hint) or (hint,)
        (kind,) = (a for a in args if a is not type(None))  # one type, maybe with None
        meta = dict(f.metadata)
        if meta["stages"] is None:  # the stage named like its section
            meta["stages"] = (prefix[:-1],) if prefix else ()
        nullable = kind is Any or type(None) in args
        yield Setting(key, None if kind is Any else kind, nullable, f.default, **meta)


#: dotted key -> :class:`Setting`, every leaf of the schema in its order
SETTINGS: dict[str, Setting] = {s.key: s for s in _walk(InferenceSettings)}
#: settings holding a YAML path or an inline mapping (a section of their own loader, not of this schema)
FREE_FORM: tuple[str, ...] = tuple(k for k, s in SETTINGS.items() if s.free_form)
#: the default of every setting, as the nested dict ``configs/inference.yaml`` spells out
DEFAULTS: dict[str, Any] = dataclasses.asdict(InferenceSettings())
#: command-line flag (without ``--``) -> dotted key
FLAGS: dict[str, str] = {s.flag: k for k, s in SETTINGS.items() if s.flag is not None}
#: top-level keys a finished run writes into OUT.yaml (that file may be passed back as --config)
IGNORED = ("run",)
_SECTIONS = tuple(k for k, v in DEFAULTS.items() if isinstance(v, dict))

assert len(FLAGS) == sum(s.flag is not None for s in SETTINGS.values()), "a flag names two settings"
for _stage in {st for s in SETTINGS.values() for st in s.stages}:
    _names = [s.name for s in SETTINGS.values() if _stage in s.stages]
    assert len(_names) == len(set(_names)), f"two settings of stage {_stage} share a cache-key name"


def flag_settings() -> list[Setting]:
    """The settings that have a command-line flag, in schema order."""
    return [s for s in SETTINGS.values() if s.flag is not None]


# ----------------------------------------------------------------------------- validation
def check_settings(cfg: DictConfig) -> None:
    """Every setting known, of the right type and in range: a typo such as ``atom.stesp=10`` or a
    value such as ``atom.steps=abc`` stops the run here, not as a traceback deep inside a stage.
    Keys and types are checked by merging the config into the schema's OmegaConf structured config
    (:class:`InferenceSettings`); ranges by each setting's :class:`Check`."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # noqa: BLE001 - interpolation errors in the user's YAML
        raise UserError(f"bad config: {exc}") from exc
    plain = {k: v for k, v in plain.items() if k not in IGNORED}
    for name in _SECTIONS:  # atom=3: OmegaConf's merge error names no key
        if not isinstance(plain.get(name, {}), dict):
            raise UserError(f"{name} must be a section of settings ({name}.KEY=VALUE), got {plain[name]!r}")
    try:
        OmegaConf.merge(OmegaConf.structured(InferenceSettings), plain)
    except ConfigKeyError as exc:  # the first unknown key
        prefix = exc.full_key.rpartition(".")[0] + "." if "." in exc.full_key else ""
        names = [k for k in SETTINGS if k.startswith(prefix)] + [s for s in _SECTIONS if not prefix]
        raise UserError(  # the first unknown key, named as the trainers name theirs (moditalker.config)
            f"unknown setting {exc.full_key}; see configs/inference.yaml for the keys "
            f"(sections: {', '.join(_SECTIONS)}){did_you_mean(exc.full_key, names)}"
        ) from None
    except ValidationError as exc:  # a value OmegaConf cannot convert to the setting's type
        if exc.full_key not in SETTINGS:
            raise UserError(f"bad config: {exc.msg}") from None
        value = _given(plain, exc.full_key)
        shown = "null" if value is None else repr(value)
        raise UserError(f"{exc.full_key} must be {SETTINGS[exc.full_key].kind}, got {shown}") from None
    for key, s in SETTINGS.items():
        s.validate(_given(plain, key, s.default))


def _given(plain: dict, key: str, default: Any = None) -> Any:
    """The value of dotted ``key`` in a plain nested dict (``default`` when absent)."""
    *sections, leaf = key.split(".")
    for name in sections:
        plain = plain.get(name, {})
    return plain.get(leaf, default)


def inherit_settings(cfg: DictConfig) -> None:
    """Fill each null setting that inherits another's value (``atom.seed`` <- ``seed``), in place.
    (A section that is not a mapping is left for :func:`check_settings` to report.)"""
    for s in SETTINGS.values():
        parent, _, leaf = s.key.rpartition(".")
        node = cfg.get(parent) if parent else cfg
        if s.inherit is not None and OmegaConf.is_dict(node) and node.get(leaf) is None:
            node[leaf] = OmegaConf.select(cfg, s.inherit)


# ----------------------------------------------------------------------------- cache keys
def stage_settings(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The settings part of ``stage``'s cache key: ``{leaf name: value}`` of every setting whose
    ``stages`` names it, typed by the schema; a free-form stage config by :func:`config_identity`."""
    parts: dict[str, Any] = {}
    for s in SETTINGS.values():
        if stage in s.stages:
            value = OmegaConf.select(cfg, s.key)
            parts[s.name] = config_identity(value) if s.free_form else s.typed(value)
    return parts


def stage_config(node: Any) -> Any:
    """A stage's ``config`` setting for its loader: a YAML path (relative paths are tried against the
    working folder, then the repository) or an inline mapping (plain dict); None = the loader's default."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, str):
        path = Path(node).expanduser()
        if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        if not path.is_file():
            raise UserError(f"stage config file not found: {node}")
        return str(path)
    return node


def config_identity(node: Any) -> Any:
    """Cache-key part of a stage config: the file's digest for a path, else the value itself."""
    value = stage_config(node)
    return file_sha256(value) if isinstance(value, str) else value


if __name__ == "__main__":
    from pipeline.settings_table import main

    raise SystemExit(main())
