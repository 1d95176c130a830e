"""pipeline.settings: every inference setting is defined once, and defaults, validation, flags and
the settings part of the stage cache keys all come from that one schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moditalker.config import load_config
from moditalker.errors import UserError
from moditalker.fileio import file_sha256
from pipeline.cli import build_parser
from pipeline.inference import resolve_config
from pipeline.settings import (
    DEFAULTS,
    FLAGS,
    FREE_FORM,
    SETTINGS,
    InferenceSettings,
    check_settings,
    inherit_settings,
    stage_settings,
)

REPO = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str, path: Path | None = None):
    return load_config(path, list(overrides), defaults=DEFAULTS)


def _refused(cfg) -> str:
    with pytest.raises(UserError) as exc:
        check_settings(cfg)
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- one definition
def test_defaults_schema_and_yaml_agree():
    import pipeline.inference

    on_disk = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "inference.yaml"))
    assert on_disk == DEFAULTS == dataclasses.asdict(InferenceSettings())
    assert pipeline.inference.DEFAULTS is DEFAULTS
    for key, s in SETTINGS.items():  # each leaf's default is the one in the tree, and is valid
        assert OmegaConf.select(OmegaConf.create(DEFAULTS), key) == s.default, key
        assert s.help.strip(), f"{key} has no help"
        s.validate(s.default)
    check_settings(_cfg(path=REPO / "configs" / "inference.yaml"))


def test_tiny_config_validates():
    from MToV.generate import check_sampling

    cfg = _cfg(path=REPO / "configs" / "inference_tiny.yaml")
    check_settings(cfg)
    check_sampling(float(cfg.mtov.start_ratio), int(cfg.mtov.sampling_timesteps))
    assert cfg.atom.steps < DEFAULTS["atom"]["steps"]


def test_free_form_settings_are_the_stage_configs():
    assert set(FREE_FORM) == {"atom.config", "mtov.config"}
    assert all(s.type is not None for k, s in SETTINGS.items() if k not in FREE_FORM)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "override,message",
    [
        ("atom.stesp=10", "unknown setting atom.stesp; see configs/inference.yaml"),
        ("nonsense=3", "unknown setting nonsense; see configs/inference.yaml"),
        ("mtov.precison=int8", "unknown setting mtov.precison; see configs/inference.yaml"),
        ("mtov.precison=int8", "; did you mean mtov.precision?"),
        ("atom.steps=abc", "atom.steps must be an integer, got 'abc'"),
        ("atom.steps=null", "atom.steps must be an integer, got null"),
        ("atom.ema=3", "atom.ema must be true or false, got 3"),
        ("device=3", "device must be a string, got 3"),
        ("min_audio_seconds=abc", "min_audio_seconds must be a number, got 'abc'"),
        ("atom.guidance_weight=.inf", "atom.guidance_weight must be a finite number"),
        ("atom.eta=1.5", "atom.eta must be in [0, 1], got 1.5"),
        ("mtov.start_ratio=1", "mtov.start_ratio must be in (0, 1), got 1"),
        ("hubert.random_hidden_size=6", "hubert.random_hidden_size must be a positive multiple of 4"),
        ("reference.max_frames=0", "reference.max_frames must be >= 1, got 0"),
        ("reference.max_frames='0'", "reference.max_frames must be >= 1, got '0'"),  # OmegaConf converts it
        ("output.crf=-1", "output.crf must be in 0..51, got -1"),
        ("atom.seed=-1", "atom.seed must be in 0..2**63-1, got -1"),
        ("mtov.precision=fp16", "mtov.precision must be one of auto, bf16, fp32, int8, got 'fp16'"),
        ("output.preset=fastest", "output.preset must be an x264 preset (ultrafast, "),
        ("atom.config=3", "atom.config must be a YAML path or a mapping, got 3"),
        ("mtov=3", "mtov must be a section of settings (mtov.KEY=VALUE), got 3"),
    ],
)
def test_bad_setting_is_refused_in_one_line(override, message):
    assert message in _refused(_cfg(override))


def test_markdown_table_lists_every_setting():
    from pipeline.settings_table import markdown_table

    rows = markdown_table().splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == list(SETTINGS)
    assert "| `atom.steps` | `--steps` | `50` | an integer >= 1 | AToM DDIM steps |" in rows


def test_every_setting_checks_its_type_and_null():
    wrong = {int: "abc", float: "abc", bool: "abc", str: 3}
    for key, s in SETTINGS.items():
        if s.free_form:
            continue
        value = wrong[s.type]
        assert _refused(_cfg(f"{key}={value}")) == f"{key} must be {s.kind}, got {value!r}"
        if s.nullable:
            check_settings(_cfg(f"{key}=null"))
        else:
            assert _refused(_cfg(f"{key}=null")) == f"{key} must be {s.kind}, got null"


def test_run_section_of_a_finished_config_is_accepted():
    check_settings(_cfg("run.n_frames=75", "run.audio_seconds=3.0"))


# ----------------------------------------------------------------------------- flags
def test_flags_map_to_their_settings():
    assert FLAGS == {
        "audio": "audio",
        "ref_video": "ref_video",
        "ref_image": "ref_image",
        "out": "out",
        "work_dir": "work_dir",
        "ref_frame": "ref_frame",
        "device": "device",
        "seed": "seed",
        "random_weights": "random_weights",
        "preview": "preview",
        "overwrite": "overwrite",
        "clean_work": "clean_work",
        "steps": "atom.steps",
        "guidance": "atom.guidance_weight",
        "batch_size": "mtov.batch_size",
        "mtov_steps": "mtov.sampling_timesteps",
        "calibration_file": "mtov.calibration_file",
        "recalibrate": "mtov.recalibrate",
        "start": "start",
        "duration": "duration",
    }
    given = {int: ("7", 7), float: ("3.5", 3.5), str: ("x y.wav", "x y.wav")}
    for flag, key in FLAGS.items():
        s = SETTINGS[key]
        argv, want = (
            ([f"--{flag}"], True) if s.type is bool else ([f"--{flag}", given[s.type][0]], given[s.type][1])
        )
        cfg = resolve_config(build_parser().parse_args(argv))
        assert OmegaConf.select(cfg, key) == want, flag
        assert type(OmegaConf.select(cfg, key)) is type(want), flag
        assert f"--{flag}" in build_parser().format_help()


def test_reference_flags_are_exclusive_and_unset_flags_keep_the_config(capsys):
    with pytest.raises(UserError, match="not allowed with argument") as exc:  # one line, not the usage block
        build_parser().parse_args(["--ref_video", "v.mp4", "--ref_image", "p.png"])
    assert "\n" not in str(exc.value)
    tiny = str(REPO / "configs" / "inference_tiny.yaml")
    cfg = resolve_config(build_parser().parse_args(["--config", tiny]))
    assert cfg.atom.steps == 4 and cfg.preview is False and cfg.mtov.batch_size == 2


def test_null_stage_seeds_inherit_the_seed():
    cfg = _cfg("seed=9", "mtov.seed=3")
    inherit_settings(cfg)
    assert cfg.atom.seed == 9 and cfg.mtov.seed == 3
    cfg = _cfg("atom=3")  # not a section: left for check_settings to report
    inherit_settings(cfg)
    assert cfg.atom == 3


# ----------------------------------------------------------------------------- cache keys
def test_stage_settings_are_the_cache_key_parts():
    cfg = _cfg("atom.eta=1", path=REPO / "configs" / "inference_tiny.yaml")
    inherit_settings(cfg)
    atom = stage_settings(cfg, "atom")
    assert atom == {
        "ref_frame": 0,
        "config": file_sha256(REPO / "configs" / "atom_tiny.yaml"),
        "ema": False,
        "steps": 4,
        "eta": 1.0,
        "guidance_weight": 2.0,
        "seed": 0,
    }
    assert type(atom["eta"]) is float  # an integer given for a float setting keys as the float
    mtov = stage_settings(cfg, "mtov")
    assert set(mtov) == {
        "ref_frame",
        "config",
        "batch_size",
        "start_ratio",
        "sampling_timesteps",
        "use_last_as_reference",
        "precision",
        "seed",
    }
    assert mtov["config"] == file_sha256(REPO / "configs" / "mtov_tiny.yaml")
    assert stage_settings(cfg, "reference") == stage_settings(cfg, "align") == {"size": 256}
    for stage in ("landmarks", "recon", "hubert"):
        assert stage_settings(cfg, stage) == {}


def test_a_setting_changes_only_its_stages_keys():
    stages = ("reference", "landmarks", "recon", "hubert", "atom", "align", "mtov")
    base = _cfg()
    inherit_settings(base)
    for override, changed in [
        ("atom.steps=3", {"atom"}),
        ("mtov.precision=fp32", {"mtov"}),
        ("ref_frame=2", {"atom", "mtov"}),
        ("size=128", {"reference", "align"}),
        ("hubert.batch_size=1", set()),
        ("output.crf=20", set()),
        ("device=cpu", set()),
    ]:
        cfg = _cfg(override)
        inherit_settings(cfg)
        assert {s for s in stages if stage_settings(cfg, s) != stage_settings(base, s)} == changed, override
