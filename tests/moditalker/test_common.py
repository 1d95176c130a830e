"""The shared helpers every CLI uses: errors, devices, configs, atomic writes."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from moditalker.config import load_config, save_config
from moditalker.device import (
    amx_bf16_supported,
    cpu_isa_missing,
    int8_dot_supported,
    resolve_device,
)
from moditalker.errors import UserError
from moditalker.fileio import check_output, load_npy, save_npy


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu7")


def test_int8_dot_products_are_read_from_the_cpu_flags_and_the_onednn_cap():
    zen3 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n"  # AVX2 only
    zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    alder = "flags\t\t: avx2 avx_vnni\n"
    assert not int8_dot_supported(zen3, max_isa="")
    assert int8_dot_supported(zen4, max_isa="") and int8_dot_supported(alder, max_isa="")
    assert int8_dot_supported("flags : amx_int8 amx_tile\n", max_isa="")
    # oneDNN capped below VNNI (ONEDNN_MAX_CPU_ISA) cannot use them
    assert not int8_dot_supported(zen4, max_isa="AVX2") and not int8_dot_supported(
        zen4, max_isa="avx512_core"
    )
    assert int8_dot_supported(zen4, max_isa="AVX512_CORE_VNNI")
    assert int8_dot_supported() == int8_dot_supported(open("/proc/cpuinfo").read())  # this machine's answer


def test_amx_bf16_tiles_are_read_from_the_cpu_flags_and_the_onednn_cap(monkeypatch):
    zen4 = "flags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"  # bf16 dot products, no tiles
    sapphire = "flags\t\t: avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8\n"
    assert not amx_bf16_supported(zen4, max_isa="") and amx_bf16_supported(sapphire, max_isa="")
    # oneDNN's own names for no cap, an AMX level, or an unknown word (which oneDNN ignores)
    for no_cap in ("DEFAULT", "default", "ALL", "avx512_core_amx", "AVX10_1_512_AMX_FP16", "bogus"):
        assert amx_bf16_supported(sapphire, max_isa=no_cap), no_cap
    for below in ("AVX512_CORE_BF16", "avx2", "AVX10_1_512", "AVX10_2_512", "AVX512_CORE_FP16"):
        assert not amx_bf16_supported(sapphire, max_isa=below), below
    # the cap comes from ONEDNN_MAX_CPU_ISA, else its older name DNNL_MAX_CPU_ISA
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert not amx_bf16_supported(sapphire) and not int8_dot_supported(sapphire)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "DEFAULT")
    assert amx_bf16_supported(sapphire) and int8_dot_supported(sapphire)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
def test_cpu_isa_caps_name_what_a_new_process_needs():
    capped = {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
    assert cpu_isa_missing("avx2", {}) == capped
    assert cpu_isa_missing("avx2", {**capped, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) == {
        "ONEDNN_MAX_CPU_ISA": "AVX2"
    }
    assert cpu_isa_missing("avx2", capped) == {} and cpu_isa_missing("native", {}) == {}
    with pytest.raises(UserError, match="unknown CPU instruction set 'sse2'"):
        cpu_isa_missing("sse2", {})
    # in a process started with the caps, the libraries report them and bf16, AMX and int8 dot
    # products are off, whatever this CPU has
    code = "import json; from moditalker.device import cpu_isa_report as r; print(json.dumps(r()))"
    env = {k: v for k, v in os.environ.items() if k != "DNNL_MAX_CPU_ISA"}
    run = subprocess.run([sys.executable, "-c", code], env={**env, **capped}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["aten"] == "AVX2" and report["onednn_max_isa"] == "AVX2" and report["fbgemm"] == "AVX2"
    assert report["bf16"] is False and report["amx_bf16"] is False and report["int8_dot_products"] is False


def test_bf16_needs_bf16_instructions_not_only_onednn(monkeypatch):
    """oneDNN says bf16 on plain AVX512 too, where it is emulated: the CPU flags must show it."""
    import moditalker.device as device

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(device, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert not device.bf16_supported(cpu)  # Skylake/Cascade Lake: no bf16 instructions
    monkeypatch.setattr(device, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert device.bf16_supported(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")  # capped below bf16
    assert not device.bf16_supported(cpu)
    monkeypatch.setattr(device, "_cpu_flags", lambda: frozenset())  # flags unreadable: oneDNN decides
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert device.bf16_supported(cpu)


def test_config_overrides_and_save(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("a: 1\nb:\n  c: x\n")
    cfg = load_config(yaml, ["b.c=y", "d=3"])
    assert cfg.a == 1 and cfg.b.c == "y" and cfg.d == 3
    save_config(cfg, tmp_path / "out" / "resolved.yaml")
    assert load_config(tmp_path / "out" / "resolved.yaml").b.c == "y"
    with pytest.raises(UserError, match="key=value"):
        load_config(yaml, ["oops"])
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_atomic_npy_and_no_overwrite(tmp_path):
    out = tmp_path / "x" / "a.npy"
    save_npy(out, np.arange(3, dtype=np.float32))
    assert load_npy(out).tolist() == [0, 1, 2]
    assert [p.name for p in out.parent.iterdir()] == ["a.npy"]
    with pytest.raises(UserError, match="--overwrite"):
        check_output(out)
    assert check_output(out, overwrite=True) == out
    with pytest.raises(UserError, match="not found"):
        load_npy(tmp_path / "nope.npy")


def test_check_output_folder_in_the_way(tmp_path):
    """An output path that is a folder (with --overwrite: an IsADirectoryError traceback after all
    the work, in AToM.inference, data.audio and MToV.sample) or whose parent is a file."""
    (tmp_path / "d.npy").mkdir()
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is a folder"):
            check_output(tmp_path / "d.npy", overwrite)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        check_output(tmp_path / "afile" / "sub" / "o.npy")
    assert not (tmp_path / "afile").is_dir()


def test_cli_main_prints_one_line_and_exits_2():
    code = (
        "from moditalker.errors import cli_main, fail\n"
        "cli_main(lambda argv: fail('input foo.npy has shape [3]; expected [68, 3]'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: input foo.npy has shape [3]; expected [68, 3]"


def _command_defaults() -> dict[str, list[dict]]:
    """Each shipped config and the defaults of the commands that read it."""
    from AToM.train import TRAIN_DEFAULTS
    from MToV.loading import MODEL_DEFAULTS
    from MToV.train_autoencoder import DEFAULTS as AE_DEFAULTS
    from MToV.train_diffusion import DEFAULTS as DIFF_DEFAULTS
    from pipeline.inference import DEFAULTS as PIPELINE_DEFAULTS

    return {
        "atom": [TRAIN_DEFAULTS],
        "mtov_autoencoder": [AE_DEFAULTS],
        "mtov_diffusion": [DIFF_DEFAULTS, MODEL_DEFAULTS],
        "mtov_tiny": [DIFF_DEFAULTS, MODEL_DEFAULTS],
        "mtov_learning": [DIFF_DEFAULTS, MODEL_DEFAULTS],
        "inference": [PIPELINE_DEFAULTS],
    }


def test_every_shipped_config_loads_and_a_foreign_file_is_refused(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    table = _command_defaults()
    assert len(configs) >= 10
    for path in configs:
        families = [k for k in table if path.stem.startswith(k)]
        assert families, f"no command listed for {path.name}"
        for defaults in table[max(families, key=len)]:
            load_config(path, (), defaults)
    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    with pytest.raises(UserError, match="not a config for this command"):
        load_config(text, (), table["atom"][0])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(listing, (), table["atom"][0])
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, (), {"a": 1}).a == 1  # an empty file: the defaults


def test_strict_config_refuses_unknown_keys(tmp_path):
    """A trainer ran the default number of steps for ``train.max_stpes=5`` and saved the typo."""
    defaults = {"train": {"max_steps": 10, "lr": 0.1}, "autoencoder_ldmk": None}
    with pytest.raises(UserError, match=r"unknown setting train.max_stpes; did you mean train.max_steps\?"):
        load_config(None, ["train.max_stpes=5"], defaults, strict=True)
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1\ntrian:\n  lr: 1\n")
    with pytest.raises(UserError, match="unknown setting trian; did you mean train"):
        load_config(tmp_path / "c.yaml", [], defaults, strict=True)
    cfg = load_config(None, ["autoencoder_ldmk.embed_dim=4"], defaults, strict=True)  # below a None default
    assert cfg.autoencoder_ldmk.embed_dim == 4
    assert load_config(None, ["train.max_stpes=5"], defaults).train.max_stpes == 5  # not strict: kept


@pytest.mark.parametrize(
    "yaml_text, overrides, message",
    [
        ("train: 5\n", [], "train must be a section (key: value lines)"),
        ("", ["train.lr=abc"], "train.lr must be a number"),
        ("", ["train.ema_decay=.nan"], "train.ema_decay must be a number (in"),
        ("train:\n  cpu: 3\n", [], "train.cpu must be true or false"),
        ("model:\n  - 1\n", [], "cannot parse config"),  # a section given as a list: not mergeable
    ],
)
def test_strict_config_refuses_values_of_another_kind(tmp_path, yaml_text, overrides, message):
    """A trainer's config value of another kind than its default ran on into a traceback (``train: 5``,
    ``lr: abc``) or into NaN weights (``ema_decay: .nan``)."""
    defaults = {
        "model": {"dim": 8},
        "train": {"lr": 0.1, "ema_decay": 0.99, "cpu": False, "max_steps": 10, "resume": "auto"},
        "extra": None,
    }
    (tmp_path / "c.yaml").write_text(yaml_text + "extra: 1\n")
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(tmp_path / "c.yaml", overrides, defaults, strict=True)
    # the same kinds pass: an int for a float, null for a number, anything below a None default, and a
    # switch given as 0/1, null or a mode's name (the UNet trainer's train.amp=bf16)
    ok = ["train.lr=1", "train.max_steps=null", "train.resume=/x/state", "extra.a=[1]", "train.cpu=bf16"]
    cfg = load_config(tmp_path / "c.yaml" if not yaml_text else None, ok, defaults, strict=True)
    assert (
        cfg.train.lr == 1 and cfg.train.max_steps is None and cfg.extra.a == [1] and cfg.train.cpu == "bf16"
    )
    for switch in ("1", "0", "null", "true"):
        load_config(None, [f"train.cpu={switch}"], defaults, strict=True)


def test_an_empty_config_file_says_so(tmp_path, capsys):
    """An empty (or cut to nothing) config ran silently with every default, full size included."""
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    cfg = load_config(tmp_path / "empty.yaml", [], {"train": {"lr": 0.1}})
    assert cfg.train.lr == 0.1
    assert (
        capsys.readouterr().err
        == f"warning: config {tmp_path / 'empty.yaml'} is empty; every setting takes its default\n"
    )
