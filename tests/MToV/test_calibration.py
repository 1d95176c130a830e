"""mtov.precision=auto on the CPU by measurement (MToV.calibration): a fake timer decides the choice,
the cache file (hit, miss, key change, recalibrate, read-only location), tiny networks keep the rule,
and tests never write into the user's cache folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import MToV.calibration as calibration
from moditalker.device import bf16_supported
from MToV.calibration import (
    CACHE_ENV,
    THRESHOLD,
    calibrate,
    calibration_key,
    choose,
    default_cache_file,
    resolve_plan,
)
from MToV.generate import generate_video
from MToV.loading import PrecisionPlan, load_mtov, precision_plan

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "mtov_tiny.yaml")


@pytest.fixture(autouse=True)
def _one_thread_idle(monkeypatch):
    torch.set_num_threads(1)
    # the load average as on an idle machine, whatever runs beside the tests (a measurement made while
    # busy is redone by the first idle run: tests that want that set it themselves)
    monkeypatch.setattr(calibration, "_load_average", lambda: 0.5)


@pytest.fixture(scope="module")
def models():
    return load_mtov(None, None, None, config=TINY, random_weights=True)


class FakeTimer:
    """Returns the seconds given per label (``autoencoders/int8``, ``unet/fp32``, ...) without running
    anything, and records which labels it was asked for."""

    def __init__(self, **seconds: float) -> None:
        self.seconds = {k.replace("__", "/"): v for k, v in seconds.items()}
        self.calls: list[str] = []

    def __call__(self, label, fn):
        self.calls.append(label)
        net, precision, *part = label.split("/")
        got = self.seconds[f"{net}/{precision}"]
        if not part:
            return got
        # an autoencoder's encode and decode: a third each, so that a clip (2 encodes + 1 decode) = got
        return tuple(v / 3 for v in got) if isinstance(got, tuple) else got / 3


def _cal(models, tmp_path, timer, **kw):
    return calibrate(models, cache_file=tmp_path / "cal.json", timer=timer, min_params=0, **kw)


def test_the_fake_timer_decides(models, tmp_path):
    times = dict(autoencoders__int8=6.0, autoencoders__bf16=7.0, autoencoders__fp32=10.0)
    fast = FakeTimer(**times, unet__int8=1.0, unet__fp32=1.1)  # the UNet gains 1.10x < 1.15x: fp32
    cal = _cal(models, tmp_path, fast)
    assert cal.source == "measured"
    assert cal.plan == PrecisionPlan("int8", unet="fp32")
    assert "autoencoders int8: 1.67x" in cal.reason and "unet fp32: int8 only 1.10x" in cal.reason
    want = [f"autoencoders/{p}/{part}" for p in ("int8", "fp32") for part in ("encode", "decode")]
    want += ["unet/int8", "unet/fp32"]
    if bf16_supported(models.device):  # bf16 is a candidate only where the CPU has bf16 instructions
        want[:0] = ["autoencoders/bf16/encode", "autoencoders/bf16/decode"]
    assert fast.calls == want
    # int8 buys nothing (the AVX2-only EPYC): the exact fp32 path
    flat = FakeTimer(autoencoders__int8=9.5, autoencoders__bf16=12.0, autoencoders__fp32=10.0)
    flat.seconds |= {"unet/int8": 2.0, "unet/fp32": 2.0}
    cal = _cal(models, tmp_path / "other", flat)
    assert cal.plan == PrecisionPlan("fp32", unet="fp32")
    # bf16 the fastest, the UNet's int8 over the threshold
    bf16 = FakeTimer(autoencoders__int8=7.0, autoencoders__bf16=5.0, autoencoders__fp32=10.0)
    bf16.seconds |= {"unet/int8": 1.0, "unet/fp32": 1.0 * THRESHOLD}
    plan = _cal(models, tmp_path / "third", bf16).plan
    assert plan.unet == "int8"
    assert plan.autoencoders == ("bf16" if bf16_supported(models.device) else "int8")


def test_choose_threshold():
    seconds = {"autoencoders": {"fp32": 10.0, "int8": 10.0 / 1.14}, "unet": {"fp32": 1.0}}
    plan, reason = choose(seconds)
    assert plan == PrecisionPlan("fp32") and "below 1.15x" in reason
    assert choose(seconds, threshold=1.1)[0] == PrecisionPlan("int8")


def test_cache_hit_miss_and_key_change(models, tmp_path):
    timer = FakeTimer(
        autoencoders__int8=5.0, autoencoders__bf16=6.0, autoencoders__fp32=10.0, unet__int8=1, unet__fp32=2
    )
    first = _cal(models, tmp_path, timer)
    n_measured = len(timer.calls)
    assert first.source == "measured" and first.cache_file == str(tmp_path / "cal.json")
    stored = json.loads((tmp_path / "cal.json").read_text())
    (entry,) = stored["entries"].values()
    assert entry["key"] == calibration_key(models.config) and entry["seconds"] == first.seconds
    assert entry["key"]["threads"] == 1 and entry["key"]["torch"] == torch.__version__

    again = _cal(models, tmp_path, timer)  # hit: nothing timed, the same choice and times
    assert again.source == "cache" and len(timer.calls) == n_measured
    assert again.plan == first.plan and again.seconds == first.seconds

    def no_models():
        raise AssertionError("a cache hit needs no networks")

    hit = calibrate(no_models, models.config, cache_file=tmp_path / "cal.json", timer=timer, min_params=0)
    assert hit.source == "cache" and hit.plan == first.plan

    torch.set_num_threads(2)  # another thread count is another key: measured again
    try:
        other = _cal(models, tmp_path, timer)
    finally:
        torch.set_num_threads(1)
    assert other.source == "measured" and len(timer.calls) == 2 * n_measured
    assert other.key["threads"] == 2
    assert len(json.loads((tmp_path / "cal.json").read_text())["entries"]) == 2
    # other network sizes: another key
    bigger = dict(models.config)
    assert calibration_key({**bigger, "unet": {"model_channels": 999}}) != calibration_key(models.config)
    # a broken file is a miss, not an error
    (tmp_path / "cal.json").write_text("{not json")
    assert _cal(models, tmp_path, timer).source == "measured"


@pytest.mark.parametrize(
    "seconds",
    [
        {"autoencoders": {"fp32": 10.0, "fp64": 1.0}, "unet": {"fp32": 1.0}},  # no such arithmetic
        {"autoencoders": {"fp32": 10.0}, "unet": {"fp32": 2.0, "bf16": 1.0}},  # not timed for the UNet
        {"autoencoders": {"fp32": 10.0, "int8": float("nan")}, "unet": {"fp32": 1.0}},
        {"autoencoders": {"fp32": 10.0, "int8": -1.0}, "unet": {"fp32": 1.0}},
        {"autoencoders": {"fp32": "fast"}, "unet": {"fp32": 1.0}},
        {"autoencoders": ["fp32"], "unet": {"fp32": 1.0}},
    ],
)
def test_a_damaged_stored_entry_is_measured_again(models, tmp_path, seconds):
    """An entry edited by hand (or damaged) could make ``auto`` report and key a plan such as fp64 that
    nothing runs; it is a miss, measured again, with a line saying so."""
    timer = FakeTimer(
        autoencoders__int8=5.0, autoencoders__bf16=6.0, autoencoders__fp32=10.0, unet__int8=1, unet__fp32=2
    )
    first = _cal(models, tmp_path, timer)
    stored = json.loads((tmp_path / "cal.json").read_text())
    (key_id,) = stored["entries"]
    stored["entries"][key_id]["seconds"] = seconds
    (tmp_path / "cal.json").write_text(json.dumps(stored))
    lines: list[str] = []
    again = _cal(models, tmp_path, timer, log=lines.append)
    assert again.source == "measured" and again.plan == first.plan
    assert any("stored entry" in line and "damaged" in line for line in lines), lines


def test_a_stored_entry_does_not_time_tiny_networks(models, tmp_path):
    """The rule for networks under MIN_PARAMS comes before the stored entries: an entry stored for the
    same key (here measured with ``min_params=0``) is not used for them."""
    timer = FakeTimer(
        autoencoders__int8=5.0, autoencoders__bf16=6.0, autoencoders__fp32=10.0, unet__int8=1, unet__fp32=1
    )
    assert _cal(models, tmp_path, timer).plan == PrecisionPlan("int8")
    cal = calibrate(models, cache_file=tmp_path / "cal.json", timer=timer)  # MIN_PARAMS
    assert cal.source == "rule" and cal.plan == precision_plan("auto", models.device)


def test_recalibrate_measures_again_and_replaces(models, tmp_path):
    slow_int8 = FakeTimer(autoencoders__int8=9.9, autoencoders__bf16=9.9, autoencoders__fp32=10.0)
    slow_int8.seconds |= {"unet/int8": 1.0, "unet/fp32": 1.0}
    assert _cal(models, tmp_path, slow_int8).plan == PrecisionPlan("fp32")
    fast_int8 = FakeTimer(autoencoders__int8=4.0, autoencoders__bf16=9.9, autoencoders__fp32=10.0)
    fast_int8.seconds |= {"unet/int8": 1.0, "unet/fp32": 1.0}
    assert _cal(models, tmp_path, fast_int8).source == "cache" and not fast_int8.calls
    cal = _cal(models, tmp_path, fast_int8, recalibrate=True)
    assert cal.source == "measured" and cal.plan == PrecisionPlan("int8") and fast_int8.calls
    (entry,) = json.loads((tmp_path / "cal.json").read_text())["entries"].values()
    assert entry["seconds"]["autoencoders"]["int8"] == 4.0


def test_unwritable_location_writes_nothing(models, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    lines = []
    timer = FakeTimer(autoencoders__int8=4.0, autoencoders__bf16=9.0, autoencoders__fp32=10.0)
    timer.seconds |= {"unet/int8": 1.0, "unet/fp32": 1.0}
    cal = calibrate(
        models, cache_file=blocker / "sub" / "cal.json", timer=timer, min_params=0, log=lines.append
    )
    assert cal.source == "measured" and cal.plan == PrecisionPlan("int8") and cal.cache_file is None
    assert any("not saved" in line for line in lines) and sorted(p.name for p in tmp_path.iterdir()) == [
        "a_file"
    ]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert _cal(models, ro, timer).cache_file is None and not list(ro.iterdir())
        finally:
            ro.chmod(0o755)


def test_tiny_networks_and_other_devices_keep_the_rule(models, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))

    def no_timing(*a, **k):
        raise AssertionError("nothing is timed")

    monkeypatch.setattr(calibration, "measure", no_timing)
    cal = resolve_plan("auto", models, models.device)  # the tiny config: fewer than MIN_PARAMS
    assert cal.source == "rule" and cal.plan == precision_plan("auto", models.device)
    assert not (tmp_path / "cache").exists()  # nothing written

    def no_load():
        raise AssertionError("the size comes from the config: nothing is loaded")

    assert resolve_plan("auto", no_load, torch.device("cpu"), models.config).plan == cal.plan
    fixed = resolve_plan("fp32", models, models.device)
    assert fixed.source == "fixed" and fixed.plan == PrecisionPlan("fp32")
    # generate_video resolves a name the same way, and runs a given plan as given
    lv = np.zeros((3, 3, models.resolution, models.resolution), np.uint8)
    kw = dict(sampling_timesteps=8, progress=False, batch_size=1)
    by_name = generate_video(models, lv, lv, lv[0], precision="fp32", **kw)
    by_plan = generate_video(models, lv, lv, lv[0], precision=PrecisionPlan("fp32"), **kw)
    np.testing.assert_array_equal(by_name, by_plan)


def test_default_location_and_tests_never_use_the_user_cache(monkeypatch, tmp_path):
    # conftest points the cache to a temp folder for the whole run (and its subprocesses)
    assert Path(os.environ[CACHE_ENV]).resolve() != (Path.home() / ".cache" / "moditalker").resolve()
    assert default_cache_file() == Path(os.environ[CACHE_ENV]) / "precision_calibration.json"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_file() == tmp_path / "xdg" / "moditalker" / "precision_calibration.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_file() == tmp_path / "home" / ".cache" / "moditalker" / "precision_calibration.json"


def test_real_timer_on_tiny_networks(models, tmp_path):
    cal = calibrate(models, cache_file=tmp_path / "cal.json", min_params=0)
    assert cal.source == "measured" and cal.measure_seconds < 30
    assert set(cal.seconds["autoencoders"]) >= {"fp32", "int8"} and set(cal.seconds["unet"]) >= {"fp32"}
    assert all(s > 0 for times in cal.seconds.values() for s in times.values())
    assert cal.plan == choose(cal.cpu_seconds if cal.basis == "cpu" else cal.seconds)[0]


def test_a_busy_machine_is_said(models, tmp_path, monkeypatch):
    timer = FakeTimer(autoencoders__int8=4.0, autoencoders__bf16=9.0, autoencoders__fp32=10.0)
    timer.seconds |= {"unet/int8": 1.0, "unet/fp32": 1.0}
    lines = []
    monkeypatch.setattr(calibration, "_load_average", lambda: 99.0)
    _cal(models, tmp_path, timer, log=lines.append)
    assert "measured while other jobs ran (load average 99.0" in lines[-1]
    (entry,) = json.loads((tmp_path / "cal.json").read_text())["entries"].values()
    assert entry["load_average"] == 99.0 and entry["busy"] is True
    assert _cal(models, tmp_path, timer).source == "cache"  # still busy: the stored choice holds
    monkeypatch.setattr(calibration, "_load_average", lambda: 0.1)
    lines.clear()
    again = _cal(models, tmp_path, timer, log=lines.append)  # idle now: a busy measurement is redone
    assert again.source == "measured" and "made on a busy machine" in lines[0]
    assert not any("other jobs" in line for line in lines)
    (entry,) = json.loads((tmp_path / "cal.json").read_text())["entries"].values()
    assert entry["busy"] is False
    assert _cal(models, tmp_path, timer).source == "cache"


def test_a_busy_process_decides_on_cpu_seconds(models, tmp_path, monkeypatch):
    # (wall, process CPU): the process ran a fifth of the time; wall says int8 buys nothing, CPU says 2x
    busy = FakeTimer(
        autoencoders__int8=(9.9, 2.0), autoencoders__bf16=(10.0, 2.2), autoencoders__fp32=(10.0, 4.0)
    )
    busy.seconds |= {"unet/int8": (1.0, 0.2), "unet/fp32": (1.0, 0.2)}
    cal = _cal(models, tmp_path, busy)
    assert cal.basis == "cpu" and cal.plan.autoencoders in ("int8", "bf16") and cal.plan.unet == "fp32"
    assert "machine was busy" in cal.reason and cal.cpu_seconds["autoencoders"]["fp32"] == 4.0
    assert cal.seconds["autoencoders"]["fp32"] == 10.0
    monkeypatch.setattr(calibration, "_load_average", lambda: 9.0)  # still busy: read back, same basis
    hit = _cal(models, tmp_path, busy)
    assert hit.source == "cache" and hit.basis == "cpu" and hit.plan == cal.plan
    monkeypatch.setattr(calibration, "_load_average", lambda: 0.5)  # idle: a busy measurement is redone
    assert _cal(models, tmp_path, busy).source == "measured"
    # an idle process (CPU ~ wall): the wall seconds decide
    idle = FakeTimer(
        autoencoders__int8=(9.9, 9.8), autoencoders__bf16=(10.0, 9.9), autoencoders__fp32=(10.0, 9.9)
    )
    idle.seconds |= {"unet/int8": (1.0, 1.0), "unet/fp32": (1.0, 1.0)}
    cal = _cal(models, tmp_path / "idle", idle)
    assert cal.basis == "wall" and cal.plan == PrecisionPlan("fp32")


@pytest.mark.parametrize(
    "plan", [PrecisionPlan("bf16", unet="int8"), PrecisionPlan("fp32", unet="int8"), PrecisionPlan("int8")]
)
def test_every_mix_the_measurement_can_pick_runs_close_to_fp32(models, plan):
    """The measurement picks each network's arithmetic on its own, so mixes the capability rule never
    made (bf16 or fp32 autoencoders with an int8 UNet) run too, their frames close to fp32's."""
    from benchmarks.inference import psnr

    g = torch.Generator().manual_seed(5)
    nets = load_mtov(None, None, None, config=TINY, random_weights=True)
    for p in nets.unet.parameters():  # zero-initialised output layers get weights: eps != 0
        if p.abs().sum() == 0:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    rng = np.random.default_rng(0)
    size = nets.resolution
    lv = rng.integers(0, 256, (20, 3, size, size), dtype=np.uint8)
    kw = dict(sampling_timesteps=8, progress=False, return_float=True, batch_size=2)
    fp32 = generate_video(nets, lv, lv, lv[0], precision="fp32", **kw)
    mixed = generate_video(nets, lv, lv, lv[0], precision=plan, **kw)
    assert 35 <= psnr(fp32, mixed) < float("inf")


def _add_entries(path: str, rank: int, n: int, start) -> None:
    """One rank adding ``n`` entries; a slow read (0.05 s) widens the window between read and write."""
    read = calibration._read

    def slow_read(p):
        data = read(p)
        time.sleep(0.05)
        return data

    calibration._read = slow_read
    start.wait()
    for i in range(n):
        assert calibration._write(Path(path), f"rank{rank}-{i}", {"i": i}) is None


def test_ranks_writing_the_cache_at_once_keep_every_entry(tmp_path):
    """Two processes add entries to one cache file at the same time: each read-add-write holds the
    file's lock, so no entry of one is lost to the other's write."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    path = tmp_path / "cal.json"
    procs = [ctx.Process(target=_add_entries, args=(str(path), r, 8, start)) for r in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    entries = json.loads(path.read_text())["entries"]
    assert sorted(entries) == sorted(f"rank{r}-{i}" for r in range(2) for i in range(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.json", "cal.json.lock"]
