"""GPU-only decisions checked without a GPU: what the code asks of CUDA (capabilities, the current
device, RNG states, global cuDNN settings, the benchmark's compiled UNet) with ``torch.cuda`` and the
libraries faked by monkeypatching. The GPU itself is exercised by ``tests/test_cuda.py``."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CUDA1 = torch.device("cuda", 1)


def test_bf16_supported_on_cuda_asks_the_capability_of_that_device(monkeypatch):
    """bf16 only emulated (compute capability < 8: V100, T4) is not bf16 support: ``precision auto``
    would run slow emulated autocast there; the device asked is the one given, not the current one."""
    import moditalker.device as device

    asked = []

    def capability(dev=None):
        asked.append(dev)
        return {None: (9, 0), 0: (9, 0), 1: (7, 5)}[getattr(dev, "index", dev)]

    assert torch.cuda.is_available() or not device.bf16_supported(CUDA1)  # no GPU: no question asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation says yes
    assert device.bf16_supported(torch.device("cuda", 0))
    assert not device.bf16_supported(CUDA1)
    assert asked[-1] == CUDA1


class _FakeAccelerator:
    def __init__(self, **kwargs) -> None:
        import os

        self.kwargs, self.num_processes = kwargs, int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed_type, self.device = "NO", torch.device("cuda")

    def print(self, *args) -> None:
        pass


def test_start_accelerator_makes_cuda_n_the_current_device(monkeypatch):
    """accelerate's single-process device is plain ``cuda`` (the current GPU, 0 unless set): a trainer
    run with ``--device cuda:1`` must make GPU 1 current first, or it trains on GPU 0."""
    import accelerate

    from moditalker.training.accelerator import start_accelerator

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(accelerate, "Accelerator", _FakeAccelerator)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    acc = start_accelerator("toy", CUDA1, cpu=False)
    assert current == [CUDA1] and acc.kwargs == {"cpu": False}
    start_accelerator("toy", torch.device("cuda"), cpu=False)  # plain cuda: accelerate's choice
    start_accelerator("toy", torch.device("cpu"), cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched: each rank keeps the GPU of its LOCAL_RANK
    start_accelerator("toy", CUDA1)
    assert current == [CUDA1]


def test_rng_state_saved_with_more_gpus_restores_the_ones_there(monkeypatch):
    """A run saved where 2 GPUs were visible resumes where 1 is: the missing GPU's state is skipped
    (``torch.cuda.set_rng_state_all`` would fail on the GPU that is not there)."""
    from moditalker.training.rng import rng_state, set_rng_state

    state = rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((device, s)))
    set_rng_state(state)
    assert len(restored) == 1 and restored[0][0] == 0 and torch.equal(restored[0][1], state["cuda"][0])


def test_face_detection_leaves_cudnn_benchmark_as_it_was(monkeypatch):
    """face_alignment's ``batch_detect`` sets ``torch.backends.cudnn.benchmark = True`` for the whole
    process on CUDA; every later convolution (MToV, HuBERT) would then choose its algorithm by timing."""
    import face_alignment.detection.sfd.detect as sfd

    from data.landmarks import FaceLandmarkDetector, template_face_detector

    def batch_detect(net, batch, device):
        assert device == "cuda:1"
        torch.backends.cudnn.benchmark = True  # what the library does on CUDA
        return []

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(sfd, "batch_detect", batch_detect)
    det = FaceLandmarkDetector(detector=template_face_detector)
    det.device, det.s3fd = CUDA1, None
    boxes = det._detect_boxes(np.zeros((2, 16, 16, 3), np.uint8))
    assert boxes == [None, None] and torch.backends.cudnn.benchmark is False


def test_prepare_for_device_is_undone(monkeypatch):
    """The benchmark's faithful mode runs the eager, contiguous UNet after a compiled fast mode."""
    from MToV.loading import load_mtov, prepare_for_device, undo_prepare

    models = load_mtov(None, None, None, config=REPO / "configs" / "mtov_tiny.yaml", random_weights=True)
    models.device = torch.device("cuda")  # what prepare_for_device acts on (the tensors stay on the CPU)
    unet = models.unet.diffusion_model
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    prepare_for_device(models, compile=True)  # torch.compile compiles at the first call: none here
    assert "forward" in vars(unet) and conv.weight.is_contiguous(memory_format=torch.channels_last)
    undo_prepare(models)
    assert "forward" not in vars(unet) and conv.weight.is_contiguous() and not models._prepared
    prepare_for_device(models)
    assert "forward" not in vars(unet) and models._prepared
    undo_prepare(models)
    compiled = models._compiled_forward
    prepare_for_device(models, compile=True)  # the same compiled forward: no second compilation
    assert vars(unet)["forward"] is compiled


def test_benchmark_compiles_the_fast_modes_only(monkeypatch):
    """``--compile``: the fast modes run the compiled UNet, the faithful mode the eager one whatever the
    order of ``--modes``; on a GPU each mode's MToV runs once untimed first (kernels loaded, the UNet
    compiled for every batch shape), so no compile time lands in the timings."""
    import benchmarks.inference as bench
    import MToV.calibration
    import MToV.loading
    from benchmarks.run import STAGES, ModeResult
    from MToV.loading import PrecisionPlan

    events: list[str] = []
    mtov = types.SimpleNamespace(
        resolution=8, device=CUDA1, autoencoders=lambda plan: None, unet_for=lambda plan: None
    )
    nets = types.SimpleNamespace(mtov=mtov)
    choice = types.SimpleNamespace(plan=PrecisionPlan("bf16"), source="rule", report=lambda: {})

    def run_mode(mode, nets, inputs, **kw):
        events.append(f"run {mode}")
        frames = np.zeros((4, 3, 8, 8), np.float32)
        return ModeResult(dict.fromkeys(STAGES, 1.0), {}, 0, np.zeros((4, 68, 3)), frames)

    monkeypatch.setattr("moditalker.device.resolve_device", lambda spec: CUDA1)
    monkeypatch.setattr(bench, "build_networks", lambda dev, tiny, seed: nets)
    monkeypatch.setattr(bench, "make_inputs", lambda *a, **k: types.SimpleNamespace(n_frames=4))
    monkeypatch.setattr(MToV.calibration, "resolve_plan", lambda *a, **k: choice)
    monkeypatch.setattr(MToV.loading, "prepare_for_device", lambda m, compile: events.append("compiled"))
    monkeypatch.setattr(MToV.loading, "undo_prepare", lambda m: events.append("eager"))
    monkeypatch.setattr(bench, "run_mode", run_mode)
    monkeypatch.setattr(
        bench, "warm_up_mtov", lambda nets, n, sampling, faithful: events.append(f"warm {faithful}")
    )
    monkeypatch.setattr(bench, "busy_warnings", lambda report, dev: [])
    monkeypatch.setattr(bench, "_device_name", str)
    modes = ("fast", "faithful", "fast_fp32")
    bench.run_benchmark("cuda:1", seconds=0.16, modes=modes, compile=True, warmup=False, log=lambda s: None)
    assert events == [
        "compiled", "warm False", "run fast",
        "eager", "warm True", "run faithful",
        "compiled", "warm False", "run fast_fp32",
    ]  # fmt: skip


def test_mtov_warm_up_runs_both_patterns():
    """The untimed MToV pass the benchmark makes before each mode on a GPU runs as that mode does (here
    on the CPU with the tiny networks: the code path, not the kernels)."""
    from benchmarks.inference import START_RATIO, warm_up_mtov
    from benchmarks.prepare import build_networks
    from MToV.generate import SamplingOptions, generate_video, generate_video_original

    nets = build_networks(torch.device("cpu"), True, 0)
    sampling = SamplingOptions(batch_size=2, seed=0, start_ratio=START_RATIO, sampling_timesteps=25)
    shapes: list[tuple] = []
    hook = nets.mtov.unet.diffusion_model.register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape))
    )
    frames = np.random.default_rng(1).integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    try:
        for faithful in (False, True):
            shapes.clear()
            warm_up_mtov(nets, 20, sampling, faithful=faithful)
            warm = set(shapes)
            shapes.clear()
            if faithful:
                generate_video_original(nets.mtov, frames, frames, frames[0], frames, sampling)
            else:
                generate_video(nets.mtov, frames, frames, frames[0], sampling, progress=False)
            assert warm and warm == set(shapes), (faithful, warm, set(shapes))  # every batch shape met
    finally:
        hook.remove()
