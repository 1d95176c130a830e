"""The fast inference path equals the original's call pattern (fp32, tiny configs), and the benchmark
that compares them runs and reports what it says."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_fixture
from torch.nn.attention import SDPBackend, sdpa_kernel

from AToM.diffusion import GaussianDiffusion
from AToM.model import MotionDecoder
from benchmarks.inference import STAGES, extrapolate, main, mtov_unet_passes, psnr
from benchmarks.prepare import randomize_zero_params
from moditalker.errors import UserError
from moditalker.timing import StageTimer
from MToV.generate import SamplingOptions, generate_video, generate_video_original
from MToV.int8 import Int8Conv
from MToV.loading import autoencoder_dtype, load_mtov, precision_plan

REPO = Path(__file__).resolve().parents[1]
X86 = platform.machine() in ("x86_64", "AMD64")
TINY_MTOV = str(REPO / "configs" / "mtov_tiny.yaml")


# ----------------------------------------------------------------------------- AToM
@pytest.fixture(scope="module")
def atom_fx() -> dict:
    return load_fixture("atom_tiny_seed0.pt")


@pytest.fixture(scope="module")
def diffusion(atom_fx) -> GaussianDiffusion:
    model = MotionDecoder(**atom_fx["config"]["MotionDecoder"])
    model.load_state_dict(atom_fx["state_dict"], strict=True)
    return GaussianDiffusion(model.eval(), **atom_fx["diffusion"]["config"]).eval()


def test_atom_fast_and_faithful_sampler_equal_the_original(atom_fx, diffusion):
    """Batched CFG with conditions encoded once == two passes per step re-encoding everything, and
    both reproduce the original's recorded 50-step DDIM output under its global seed."""
    s, i = atom_fx["diffusion"]["ddim_sample"], atom_fx["diffusion"]["inputs"]
    torch.manual_seed(s["global_seed_before_call"])
    fast = diffusion.ddim_sample(s["shape"], i["face"], i["x_pos"], i["cond"])
    calls = []
    forward = diffusion.model.forward
    diffusion.model.forward = lambda *a, **k: calls.append(k.get("cond_drop_prob")) or forward(*a, **k)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            torch.manual_seed(s["global_seed_before_call"])
            faithful = diffusion.ddim_sample(
                s["shape"], i["face"], i["x_pos"], i["cond"], guidance_mode="original"
            )
    finally:
        del diffusion.model.forward
    assert calls == [1.0, 0.0] * s["sampling_timesteps"]  # two full passes per step, as the original
    assert "guided_decode" not in vars(diffusion.model)  # a seam, not a patch: nothing was replaced
    assert (fast - s["output"]).abs().max().item() <= 1e-4
    assert (faithful - s["output"]).abs().max().item() <= 1e-4
    assert (fast - faithful).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- MToV
@pytest.fixture(scope="module")
def mtov():
    m = load_mtov(None, None, None, config=TINY_MTOV, random_weights=True)
    assert randomize_zero_params(m.unet, seed=3, std=0.1) > 0  # eps != 0, so sampling does something
    return m


def _clips(t: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lv = np.zeros((t, 3, size, size), np.uint8)
    lv[:, :, rng.integers(0, size, 12), rng.integers(0, size, 12)] = 255
    for i in range(t):  # every landmark frame distinct (equal clips would be encoded once)
        lv[i, :, 0, i % size] = 255
    target = rng.integers(0, 256, (t, 3, size, size), dtype=np.uint8)
    masked = target.copy()
    masked[:, :, size // 2 :] = 0
    return lv, masked, target[0].copy(), target


def test_mtov_fast_fp32_equals_faithful_and_does_less_work(mtov, monkeypatch):
    clip = mtov.clip_frames
    t = 3 * clip + 2  # 4 clips, the last one partial
    lv, masked, ident, target = _clips(t, mtov.resolution)
    kw = dict(seed=7, sampling_timesteps=12)
    counts = {"rgb": 0, "ldmk": 0, "unet": 0}
    for name, ae in (("rgb", mtov.ae_rgb), ("ldmk", mtov.ae_ldmk)):
        orig = ae.extract

        def counted(x, _orig=orig, _name=name):
            counts[_name] += x.shape[0]
            return _orig(x)

        monkeypatch.setattr(ae, "extract", counted)
    unet_forward = mtov.unet.forward
    monkeypatch.setattr(
        mtov.unet, "forward", lambda *a: counts.__setitem__("unet", counts["unet"] + 1) or unet_forward(*a)
    )

    with sdpa_kernel(SDPBackend.MATH):
        slow = generate_video_original(
            mtov, lv, masked, ident, target, SamplingOptions(**kw), return_float=True
        )
    faithful_counts = dict(counts)
    counts.update(rgb=0, ldmk=0, unet=0)
    options = SamplingOptions(batch_size=3, precision="fp32", **kw)
    fast = generate_video(mtov, lv, masked, ident, options, return_float=True, progress=False)
    n_clips = math.ceil(t / clip)
    passes = mtov_unet_passes(12)
    assert faithful_counts == {"rgb": 3 * n_clips, "ldmk": n_clips, "unet": n_clips * passes}
    assert counts == {"rgb": 1 + n_clips, "ldmk": n_clips, "unet": math.ceil(n_clips / 3) * passes}
    assert slow.shape == fast.shape == (t, 3, mtov.resolution, mtov.resolution)
    assert fast.dtype == np.float32 and fast.std() > 0.01
    assert np.abs(fast - slow).max() <= 1e-4
    # uint8 output is the rounded float output
    fast_u8 = generate_video(mtov, lv, masked, ident, batch_size=3, precision="fp32", progress=False, **kw)
    assert np.abs(fast_u8.astype(np.float32) - np.round((fast + 1) * 127.5)).max() <= 1


def test_mtov_bf16_autoencoders_stay_close(mtov):
    lv, masked, ident, _ = _clips(2 * mtov.clip_frames, mtov.resolution, seed=1)
    kw = dict(seed=2, sampling_timesteps=8, batch_size=2, progress=False, return_float=True)
    fp32 = generate_video(mtov, lv, masked, ident, precision="fp32", **kw)
    timings: dict[str, float] = {}
    timer = StageTimer(timings, mtov.device)
    bf16 = generate_video(mtov, lv, masked, ident, precision="bf16", timer=timer, **kw)
    assert 0 < np.abs(bf16 - fp32).max() < 0.1  # really ran in reduced precision, and stayed close
    assert psnr(bf16, fp32) >= 35
    assert set(timings) == {"encode", "unet", "decode"} and all(v > 0 for v in timings.values())


def test_mtov_int8_stays_close_and_does_not_depend_on_the_batch(mtov, monkeypatch):
    import MToV.loading as loading

    monkeypatch.setattr(loading, "int8_dot_supported", lambda: True)  # the int8 UNet on any CPU (VNNI or not)
    lv, masked, ident, _ = _clips(3 * mtov.clip_frames - 3, mtov.resolution, seed=4)
    kw = dict(seed=5, sampling_timesteps=8, progress=False, return_float=True)
    fp32 = generate_video(mtov, lv, masked, ident, precision="fp32", batch_size=3, **kw)
    int8 = generate_video(mtov, lv, masked, ident, precision="int8", batch_size=3, **kw)
    assert 0 < np.abs(int8 - fp32).max() < 0.2  # really ran in int8, and stayed close
    assert psnr(int8, fp32) >= 35
    one_by_one = generate_video(mtov, lv, masked, ident, precision="int8", batch_size=1, **kw)
    # activation scales per clip (autoencoders) and per sample (UNet convolutions), the UNet's other
    # layers batch-independent too (MToV.int8.PerSample, NCHW outputs): the same numbers in any batch.
    # (With the fp32 UNet the batch moved frames by up to 0.004, its rounding flipping int8 roundings;
    # scales shared by the batch gave 0.04.)
    assert np.array_equal(one_by_one, int8)
    plan = precision_plan("int8", mtov.device)
    ae_rgb, ae_ldmk = mtov.autoencoders(plan)
    assert mtov.autoencoders(precision_plan("int8", mtov.device))[0] is ae_rgb  # quantised once, kept
    assert ae_rgb is not mtov.ae_rgb and isinstance(mtov.ae_rgb.encoder, torch.nn.Module)
    quantised = [m for m in ae_ldmk.modules() if "quantized" in type(m).__module__]
    assert quantised and not any("quantized" in type(m).__module__ for m in mtov.ae_ldmk.modules())
    # the UNet: every convolution int8 in a copy made once; the fp32 network untouched
    assert plan.unet == "int8" and mtov.unet_for(plan) is mtov.unet_for(plan) is not mtov.unet
    convs = [m for m in mtov.unet.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    assert convs and len([m for m in mtov.unet_for(plan).modules() if isinstance(m, Int8Conv)]) == len(convs)
    assert not any(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) for m in mtov.unet_for(plan).modules())


def test_precision_choice(monkeypatch):
    import MToV.loading as loading

    cpu = torch.device("cpu")
    assert autoencoder_dtype("fp32", cpu) == torch.float32
    assert autoencoder_dtype("bf16", cpu) == torch.bfloat16
    assert autoencoder_dtype("int8", cpu) == torch.float32  # int8 layers take fp32 activations
    with pytest.raises(UserError, match="precision"):
        autoencoder_dtype("fp16", cpu)
    with pytest.raises(UserError, match="CPU only"):
        precision_plan("int8", torch.device("cuda"))
    # auto follows the device's capability, never its name
    monkeypatch.setattr(loading, "bf16_supported", lambda device: True)
    monkeypatch.setattr(loading, "amx_bf16_supported", lambda: True)  # bf16 tiles (AMX)
    assert precision_plan("auto", cpu).per_network() == {"ae_rgb": "bf16", "ae_ldmk": "bf16", "unet": "fp32"}
    assert precision_plan("auto", torch.device("cuda")).autoencoders == "bf16"
    # AVX512-BF16 dot products without AMX: int8 was faster in the whole pipeline (48.9 vs 58.9 s/s)
    monkeypatch.setattr(loading, "amx_bf16_supported", lambda: False)
    monkeypatch.setattr(loading, "int8_dot_supported", lambda: True)
    assert precision_plan("auto", cpu).per_network() == {"ae_rgb": "int8", "ae_ldmk": "int8", "unet": "int8"}
    assert precision_plan("auto", torch.device("cuda")).autoencoders == "bf16"
    assert precision_plan("bf16", cpu).per_network() == {"ae_rgb": "bf16", "ae_ldmk": "bf16", "unet": "fp32"}
    monkeypatch.setattr(loading, "bf16_supported", lambda device: False)
    monkeypatch.setattr(loading, "int8_dot_supported", lambda: True)
    assert precision_plan("auto", cpu).per_network() == {"ae_rgb": "int8", "ae_ldmk": "int8", "unet": "int8"}
    monkeypatch.setattr(loading, "int8_dot_supported", lambda: False)  # a CPU without VNNI: no gain there
    assert precision_plan("int8", cpu).per_network() == {"ae_rgb": "int8", "ae_ldmk": "int8", "unet": "fp32"}
    monkeypatch.setattr(loading, "int8_dot_supported", lambda: True)
    monkeypatch.setattr(loading, "int8_convs_supported", lambda: False)  # a torch without oneDNN int8
    assert precision_plan("int8", cpu).per_network() == {"ae_rgb": "int8", "ae_ldmk": "int8", "unet": "fp32"}
    assert precision_plan("auto", torch.device("cuda")).autoencoders == "fp32"
    assert precision_plan("fp32", cpu).per_network() == {"ae_rgb": "fp32", "ae_ldmk": "fp32", "unet": "fp32"}


# ----------------------------------------------------------------------------- benchmark
def test_unet_passes_and_extrapolation():
    assert mtov_unet_passes(100) == 25  # the official 25 UNet passes per clip
    assert mtov_unet_passes(8) == 2
    sec = {s: 1.0 for s in STAGES} | {"atom": 2.0, "mtov_unet": 3.0, "mtov": 5.0, "total": 9.0}
    full = extrapolate(sec, atom_factor=5.0, unet_factor=2.0)
    assert full["atom"] == 10.0 and full["mtov_unet"] == 6.0 and full["mtov"] == 8.0
    assert full["total"] == 9.0 + 8.0 + 3.0 and full["hubert"] == 1.0
    assert psnr(np.zeros(4), np.zeros(4)) == math.inf


def test_benchmark_tiny_report(tmp_path, capsys):
    out = tmp_path / "bench" / "report.json"
    # one thread: tiny ops on a busy 2-core machine are dominated by OpenMP barriers with two
    args = ["--tiny", "--seconds", "0.7", "--steps-scale", "0.5", "--json", str(out), "--threads", "1"]
    report = main(args + ["--no-progress"])
    on_disk = json.loads(out.read_text())
    assert on_disk["speedup_total"] == pytest.approx(report["speedup_total"])
    for mode in ("faithful", "fast", "fast_fp32"):
        assert set(STAGES) <= set(on_disk[mode]) and all(v >= 0 for v in on_disk[mode].values())
        measured = on_disk["measured"][mode]
        # extrapolated to full steps: 50 AToM steps (25 run), 25 UNet passes per clip (12 run)
        assert on_disk[mode]["atom"] == pytest.approx(measured["atom"] * 50 / 25)
        assert on_disk[mode]["mtov_unet"] == pytest.approx(measured["mtov_unet"] * 25 / 12)
        assert on_disk["peak_memory_mb"][mode] > 0
        # the total is its top-level stages (HuBERT and alignment: the fastest of their repeats)
        top = ("hubert", "atom", "align", "mtov")
        assert measured["total"] == pytest.approx(sum(measured[k] for k in top))
        assert on_disk[mode]["total"] == pytest.approx(sum(on_disk[mode][k] for k in top))
    assert on_disk["steps"] == {
        "atom": 25,
        "atom_full": 50,
        "mtov_unet_passes": 12,
        "mtov_unet_passes_full": 25,
    }
    assert on_disk["speedup_total"] == pytest.approx(on_disk["faithful"]["total"] / on_disk["fast"]["total"])
    assert on_disk["speedup_total_fp32"] == pytest.approx(
        on_disk["faithful"]["total"] / on_disk["fast_fp32"]["total"]
    )
    assert on_disk["max_abs_diff_fp32"] <= 1e-3
    assert on_disk["max_abs_diff_fp32_landmarks"] <= 1e-4
    assert on_disk["psnr_db"] == "inf" or on_disk["psnr_db"] >= 35
    assert on_disk["frames"] == 18 and on_disk["seconds_of_video"] == 0.7
    fp32_nets = {"ae_rgb": "fp32", "ae_ldmk": "fp32", "unet": "fp32"}
    assert on_disk["precision_used"]["faithful"] == on_disk["precision_used"]["fast_fp32"] == fp32_nets
    # auto on tiny networks: the capability rule (never fp32 on a CPU); full-size ones are measured
    assert on_disk["precision_used"]["fast"]["ae_rgb"] in ("bf16", "int8")
    assert on_disk["precision_choice"]["source"] == "rule"
    assert on_disk["precision_choice"]["precision_used"] == on_disk["precision_used"]["fast"]
    assert on_disk["warmup_seconds"] > 0 and on_disk["prepare_seconds"] >= 0
    assert on_disk["load_seconds"] > 0
    assert on_disk["psnr_db_fast_vs_fp32"] == "inf" or on_disk["psnr_db_fast_vs_fp32"] >= 35
    printed = capsys.readouterr().out
    assert "speedup_total" in printed and "mtov_unet" in printed
    assert isinstance(on_disk["busy_warnings"], list)


def test_benchmark_warns_when_the_machine_was_busy():
    """A busy machine gave 'speedup_total 0.05x' without a word; the report now says why not to trust it."""
    from benchmarks.inference import busy_warnings

    idle = {"clock": "wall seconds", "threads": 2, "load_average": 0.5, "speedup_total": 2.9,
            "speedup_total_fp32": 2.3, "measured": {"fast": {"total": 10.0}},
            "measured_cpu_seconds": {"fast": {"total": 19.0}}}  # fmt: skip
    assert busy_warnings(idle, torch.device("cpu")) == []
    busy = {
        **idle,
        "speedup_total": 0.05,
        "load_average": 9.0,
        "measured_cpu_seconds": {"fast": {"total": 2.0}},
    }
    warnings = busy_warnings(busy, torch.device("cpu"))
    assert len(warnings) == 3, warnings
    assert any("10% of them" in w for w in warnings) and any("0.05x < 1" in w for w in warnings)
    assert busy_warnings({**busy, "clock": "process CPU seconds (all threads)", "load_average": 0.1,
                          "speedup_total": 3.0}, torch.device("cpu")) == []  # fmt: skip


def test_benchmark_script_and_errors(tmp_path):
    script = REPO / "scripts" / "benchmark.sh"
    out = tmp_path / "fast.json"
    run = subprocess.run(
        [
            "bash",
            str(script),
            "--tiny",
            "--seconds",
            "0.3",
            "--modes",
            "fast",
            "--json",
            str(out),
            "--no-progress",
            "--threads",
            "1",
            "--clock",
            "cpu",
            "--still",
            # restarts itself as on a CPU without AVX512, bf16 or int8 dot products (x86-64 only)
            *(["--cpu-isa", "avx2"] if X86 else []),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    written = out.read_text()
    report = json.loads(written)
    assert report["speedup_total"] is None and report["psnr_db"] is None and "faithful" not in report
    assert report["clock"].startswith("process CPU") and report["fast"]["mtov_unet"] > 0
    assert report["reference"] == "still"
    if X86:
        isa = report["cpu_isa"]
        assert isa["aten"] == "AVX2" and isa["onednn_max_isa"] == "AVX2" and isa["fbgemm"] == "AVX2"
        assert isa["bf16"] is False and isa["amx_bf16"] is False and isa["int8_dot_products"] is False
        # auto on such a CPU: int8 autoencoders (fbgemm), the UNet in fp32 (no int8 dot products)
        assert report["precision_used"]["fast"] == {"ae_rgb": "int8", "ae_ldmk": "int8", "unet": "fp32"}
        assert "cpu: ATen AVX2, oneDNN AVX2, fbgemm AVX2" in run.stdout
    again = subprocess.run(
        [sys.executable, "-m", "benchmarks.inference", "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr and out.read_text() == written
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.inference", "--tiny", "--steps-scale", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "steps-scale" in bad.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seconds", "nan"], "--seconds"),
        (["--steps-scale", "inf"], "--steps-scale"),
        (["--modes", ","], "--modes"),
        (["--modes", "fast,turbo"], "turbo"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seed", "-1"], "--seed"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--json", "{file}/report.json"], "is a file"),
        pytest.param(
            ["--cpu-isa", "avx2"],
            "FBGEMM_ENABLE_INSTRUCTIONS=AVX2 .*set before the process starts",
            marks=pytest.mark.skipif(not X86, reason="x86-64 instruction sets"),
        ),
    ],
)
def test_benchmark_bad_settings_fail_before_any_work(tmp_path, monkeypatch, args, message):
    import benchmarks.inference as bench

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(bench, "build_networks", lambda *a, **k: pytest.fail("networks were built"))
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)  # --cpu-isa: a suite run capped would have nothing to add
    with pytest.raises(UserError, match=message):
        main(["--tiny", "--no-progress", *(a.format(file=blocker) for a in args)])
