"""``mtov.precision=auto`` on the CPU, decided by measurement.

Whether cheaper arithmetic pays on a CPU depends on more than its flags: on a 2-core AMD EPYC with AVX2
only, int8 autoencoders were no faster than fp32 in the whole pipeline (and cost 42.6 dB), while on one
with AVX512-VNNI they were 1.5x faster. So at the first use on a machine :func:`calibrate` times each
candidate arithmetic on the loaded networks, the way the fast path runs them (one encode and one
decode of a 16-frame clip per autoencoder precision, weighed as a clip costs there: two encodes and a
decode; one UNet pass of a batch of :data:`UNET_BATCH` clips per UNet precision), and takes reduced
precision only where it is at least :data:`THRESHOLD` times faster than fp32; otherwise the exact fp32
path.

The result is kept in a small JSON file (:func:`default_cache_file`: ``$MODITALKER_CACHE_DIR``, else
``$XDG_CACHE_HOME/moditalker``, else ``~/.cache/moditalker``; ``mtov.calibration_file`` / the
commands' flags name another), one entry per key: CPU model, threads, torch version, the instruction
caps of the process (``--cpu-isa``), the allocator, and the networks' kind and sizes. A later run with
the same key reads it back and measures nothing; ``recalibrate`` measures again. Where the file cannot be
written (a read-only location) nothing is written and the run goes on with what it measured.

Wall seconds decide, unless the process got less than :data:`BUSY_SHARE` of its threads' time while
measuring (other jobs shared the CPU): then its CPU seconds decide, which count only what it ran. On a
2-core AMD EPYC shared with about 12 other jobs, one thread, one clip's int8 encode took 66 s of wall time
and 9.3 s of CPU time, the fp32 one 113 s and 17.6 s; in another such run int8 and fp32 encode+decode
took 99.7 and 107 s of wall time (1.08x), while idle the two differ 1.9x. With two threads even CPU
seconds mislead there (threads waiting for each other count), so a measurement made on a busy machine is
marked so, said in the log, and made again by the first run that finds the machine idle.

Devices other than the CPU keep the capability rule of :func:`MToV.loading.precision_plan` (bf16
autocast on CUDA), and so do networks with fewer than :data:`MIN_PARAMS` parameters (the tiny test
and demo configs: their time is Python overhead, not arithmetic, and timing them would say nothing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from moditalker.device import CPU_ISA_ENV, allocator, bf16_supported
from moditalker.fileio import atomic_path, json_or_none
from MToV.int8 import int8_convs_supported
from MToV.loading import MToVModels, PrecisionPlan, precision_plan

__all__ = [
    "CACHE_ENV",
    "CANDIDATES",
    "FILE_NAME",
    "MIN_PARAMS",
    "THRESHOLD",
    "UNET_BATCH",
    "Calibration",
    "calibrate",
    "calibration_key",
    "choose",
    "default_cache_file",
    "measure",
    "resolve_plan",
]

#: what :func:`measure` times: network -> the arithmetic it may run in (fp32 last: see there)
CANDIDATES = {"autoencoders": ("bf16", "int8", "fp32"), "unet": ("int8", "fp32")}
THRESHOLD = 1.15  #: reduced precision only where it is at least this many times faster than fp32
MIN_PARAMS = 5_000_000  #: smaller networks keep the capability rule (their time is not arithmetic)
UNET_BATCH = 4  #: clips per calibration UNet pass (the pipeline's default batch)
#: below this share of its threads' time (process CPU / (wall x threads)) the process waited for the CPU:
#: the choice is then made on CPU seconds, not wall seconds
BUSY_SHARE = 0.6
CACHE_ENV = "MODITALKER_CACHE_DIR"  #: folder of the calibration file (tests point it to a temp folder)
FILE_NAME = "precision_calibration.json"
VERSION = 1

#: ``timer(label, fn) -> seconds`` or ``(wall, cpu)``: the time of one run of ``fn`` (labels
#: ``autoencoders/int8/encode``, ``autoencoders/int8/decode``, ``unet/fp32``, ...); tests pass a fake
#: one that returns chosen times without running ``fn``.
Timer = Callable[[str, Callable[[], object]], float]


def default_cache_file() -> Path:
    """``$MODITALKER_CACHE_DIR/precision_calibration.json``, else under ``$XDG_CACHE_HOME/moditalker``,
    else ``~/.cache/moditalker``."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(xdg) / "moditalker")
    return Path(folder).expanduser() / FILE_NAME


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibration_key(config: Any, threads: int | None = None) -> dict[str, Any]:
    """What a calibration holds for: this CPU's model, ``threads`` (default: torch's), the torch
    version, the instruction caps the process runs with, the allocator, and the networks (MToV, the
    digest of their model config ``config``: an MToV model config, e.g. ``MToVModels.config``)."""
    nets = {k: config.get(k) for k in ("autoencoder", "autoencoder_ldmk", "unet")}
    if not isinstance(config, dict):
        nets = OmegaConf.to_container(OmegaConf.create(nets), resolve=True)
    digest = hashlib.sha256(json.dumps(nets, sort_keys=True, default=str).encode()).hexdigest()[:16]
    caps = sorted({k for env in CPU_ISA_ENV.values() for k in env})
    return {
        "cpu": _cpu_model(),
        "threads": int(threads if threads is not None else torch.get_num_threads()),
        "torch": torch.__version__,
        "isa_caps": {k: os.environ[k] for k in caps if os.environ.get(k)},
        "allocator": allocator(),
        "networks": f"mtov:{digest}",
    }


def _key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Calibration:
    """The arithmetic ``auto`` runs (``plan``) and why: ``source`` ``measured`` (timed now), ``cache``
    (timed before, read back), ``rule`` (not timed: another device or tiny networks) or ``fixed``
    (precision given); ``seconds`` the wall times per network and precision (``cpu_seconds`` the
    process CPU times; ``basis`` which of the two decided); ``reason`` one line."""

    plan: PrecisionPlan
    source: str
    reason: str
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    key: dict[str, Any] | None = None
    cache_file: str | None = None
    measure_seconds: float = 0.0
    cpu_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    basis: str = "wall"  # what the choice was made on: wall or process CPU seconds (a busy machine)

    def report(self) -> dict[str, Any]:
        """For the benchmark JSON and the logs."""
        return {
            "precision_used": self.plan.per_network(),
            "source": self.source,
            "reason": self.reason,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "basis": self.basis,
            "threshold": THRESHOLD,
            "key": self.key,
            "cache_file": self.cache_file,
            "measure_seconds": round(self.measure_seconds, 2),
        }


def _clock_timer(
    label: str, fn: Callable[[], object], min_seconds: float = 1.0, max_runs: int = 3
) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``fn``, the fastest of up to ``max_runs`` runs: one when it takes
    ``min_seconds`` or more (the full-size networks: seconds per run), more for fast ones, whose
    single runs are noise."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(max_runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
        if best >= min_seconds:
            break
    return best, best_cpu


def measure(
    models: MToVModels, timer: Timer | None = None, cpu_seconds: dict[str, dict[str, float]] | None = None
) -> dict[str, dict[str, float]]:
    """Wall seconds of the fast path's work per candidate arithmetic on ``models`` (CPU): the
    autoencoders (what one clip costs as :func:`MToV.generate.stream_video` runs them, two encodes and a
    decode, from one encode and one decode timed: fp32, bf16 autocast where the CPU has bf16
    instructions, int8 linear layers) and the UNet (one pass of a batch of :data:`UNET_BATCH` clips:
    fp32, int8 convolutions where this torch build has them).
    ``cpu_seconds`` (a dict) receives the process CPU seconds where the timer gives them (the
    default one does; a timer may return seconds alone or ``(wall, cpu)``)."""
    from moditalker.device import autocast

    timer = timer or _clock_timer
    dev = models.device
    gen = torch.Generator(device=dev).manual_seed(0)
    clip = torch.empty(1, 3, models.clip_frames, models.resolution, models.resolution, device=dev)
    clip.uniform_(-1, 1, generator=gen)
    ae = models.ae_rgb
    z = torch.empty(1, ae.embed_dim, ae.latent_length, device=dev).uniform_(-1, 1, generator=gen)
    n_xy = ae.r**2
    t = torch.full((UNET_BATCH,), 100, dtype=torch.long, device=dev)
    x = z.expand(UNET_BATCH, -1, -1).contiguous()
    cond = torch.cat([z, z], dim=1).expand(UNET_BATCH, -1, -1).contiguous()
    image_cond = z[:, :, :n_xy].expand(UNET_BATCH, -1, -1).contiguous()
    # fp32 last: whatever the first run of a process pays once (thread pool, kernel set-up, first
    # touch of memory) then counts against reduced precision, so an error leans to the exact path
    usable = {"bf16": bf16_supported(dev), "int8": int8_convs_supported()}
    ae_candidates = [p for p in CANDIDATES["autoencoders"] if p != "bf16" or usable["bf16"]]
    unet_candidates = [p for p in CANDIDATES["unet"] if p != "int8" or usable["int8"]]

    def ae_run(precision: str, part: str) -> Callable[[], object]:
        def run() -> object:
            plan = PrecisionPlan(precision)
            ae_rgb, _ = models.autoencoders(plan)  # int8: the quantised copies, made once and kept
            with torch.inference_mode(), autocast(dev, plan.autoencoder_dtype):
                if part == "encode":
                    return ae_rgb.extract(clip).float()
                return ae_rgb.decode_from_sample(z).float()

        return run

    def unet_run(precision: str) -> Callable[[], object]:
        def run() -> object:
            unet = models.unet_for(PrecisionPlan("fp32", unet=precision))
            with torch.inference_mode():
                return unet(x, cond, image_cond, t)

        return run

    out: dict[str, dict[str, float]] = {"autoencoders": {}, "unet": {}}

    def timed(label: str) -> Callable[[Callable[[], object]], tuple[float, float | None]]:
        def run(fn: Callable[[], object]) -> tuple[float, float | None]:
            got = timer(label, fn)
            wall, cpu = got if isinstance(got, tuple) else (got, None)
            return float(wall), (None if cpu is None else float(cpu))

        return run

    def record(net: str, p: str, wall: float, cpu: float | None) -> None:
        out[net][p] = wall
        if cpu is not None and cpu_seconds is not None:
            cpu_seconds.setdefault(net, {})[p] = cpu

    for p in ae_candidates:
        if p == "int8":
            models.autoencoders(PrecisionPlan("int8"))  # quantising is set-up, not run time
        enc = timed(f"autoencoders/{p}/encode")(ae_run(p, "encode"))
        dec = timed(f"autoencoders/{p}/decode")(ae_run(p, "decode"))
        # a clip of the fast path: two encodes (its landmark clip, its masked reference clip) and a decode
        cpu = None if enc[1] is None or dec[1] is None else 2 * enc[1] + dec[1]
        record("autoencoders", p, 2 * enc[0] + dec[0], cpu)
    for p in unet_candidates:
        if p == "int8":
            models.unet_for(PrecisionPlan("fp32", unet="int8"))
        record("unet", p, *timed(f"unet/{p}")(unet_run(p)))
    return out


def _basis(
    seconds: dict[str, dict[str, float]], cpu: dict[str, dict[str, float]], threads: int
) -> tuple[str, dict[str, dict[str, float]], str]:
    """What the choice is made on: wall seconds, or process CPU seconds where the process got less than
    :data:`BUSY_SHARE` of its threads' time while measuring (other jobs ran: wall time is then mostly
    waiting, and ratios between runs are noise). ``(basis, times, note)``."""
    same = cpu and all(set(cpu.get(n, {})) == set(t) for n, t in seconds.items())
    wall = sum(s for t in seconds.values() for s in t.values())
    if not same or wall <= 0:
        return "wall", seconds, "wall seconds"
    share = sum(s for t in cpu.values() for s in t.values()) / (wall * max(1, threads))
    if share >= BUSY_SHARE:
        return "wall", seconds, "wall seconds"
    note = f"process CPU seconds: the machine was busy, this process ran {share:.0%} of its threads' time"
    return "cpu", cpu, note


def choose(seconds: dict[str, dict[str, float]], threshold: float = THRESHOLD) -> tuple[PrecisionPlan, str]:
    """The plan from measured ``seconds`` (see :func:`measure`): per network the fastest reduced
    precision if fp32 takes at least ``threshold`` times as long, else fp32; and why, in one line."""
    picked, why = {}, []
    for net in ("autoencoders", "unet"):
        times = seconds.get(net, {})
        fp32 = times.get("fp32")
        reduced = {p: s for p, s in times.items() if p != "fp32" and s > 0}
        best = min(reduced, key=reduced.get) if reduced else None
        if fp32 is None or best is None:
            picked[net] = "fp32"
            why.append(f"{net} fp32 (nothing else to compare)")
            continue
        gain = fp32 / reduced[best]
        listed = ", ".join(f"{p} {s:.3g} s" for p, s in times.items())
        if gain >= threshold:
            picked[net] = best
            why.append(f"{net} {best}: {gain:.2f}x faster than fp32 ({listed})")
        else:
            picked[net] = "fp32"
            why.append(f"{net} fp32: {best} only {gain:.2f}x faster, below {threshold:g}x ({listed})")
    return PrecisionPlan(picked["autoencoders"], unet=picked["unet"]), "; ".join(why)


def _read(path: Path) -> dict[str, Any]:
    data = json_or_none(path)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return {}
    if not isinstance(data.get("entries"), dict):
        return {}
    return data


def _write(path: Path, key_id: str, entry: dict[str, Any]) -> str | None:
    """Add ``entry`` to the file at ``path`` (temp name + rename); the error text if it cannot be.
    Read, add and write hold ``<file>.lock`` (one process at a time), so that ranks calibrating at once
    keep each other's entries."""
    from filelock import FileLock  # a dependency of torch

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(path.name + ".lock")):
            data = _read(path) or {"version": VERSION, "entries": {}}
            data["entries"][key_id] = entry
            with atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _params(nets: Any) -> int:
    return sum(p.numel() for net in nets for p in net.parameters())


def _config_params(config: Any) -> int:
    """Parameters of the networks of a model config, built on the meta device (no memory, no weights)."""
    from MToV.loading import build_models, model_config

    with torch.device("meta"):
        return _params(build_models(model_config(config)))


def _loaded(models: Any, loaded: list[MToVModels]) -> MToVModels | None:
    return models if isinstance(models, MToVModels) else (loaded[0] if loaded else None)


def calibrate(
    models: MToVModels | Callable[[], MToVModels],
    config: Any = None,
    *,
    cache_file: str | Path | None = None,
    recalibrate: bool = False,
    timer: Timer | None = None,
    threshold: float = THRESHOLD,
    min_params: int = MIN_PARAMS,
    log: Callable[[str], None] | None = None,
    device: torch.device | None = None,
) -> Calibration:
    """``auto``'s plan on the CPU: read back for this key (:func:`calibration_key`) from ``cache_file``
    (default :func:`default_cache_file`), else measured (:func:`measure` with ``timer``) and stored.

    ``models`` is the loaded networks or a function that loads them, called only when they are
    needed (a measurement); ``config`` is their model config (default ``models.config``), which keys
    the result and gives their size (:data:`MIN_PARAMS`) without loading anything; ``device`` theirs
    (default: ``models.device``, else the CPU). ``recalibrate``
    measures even when a result is stored. ``log`` gets one line on what was chosen and why."""
    say = log or (lambda _line: None)
    loaded: list[MToVModels] = []

    def get() -> MToVModels:
        if not loaded:
            loaded.append(models() if callable(models) and not isinstance(models, MToVModels) else models)
        return loaded[0]

    if config is None:
        config = get().config
    key = calibration_key(config)
    path = Path(cache_file).expanduser() if cache_file else default_cache_file()
    key_id = _key_id(key)
    # what is not timed (another device, tiny networks) takes the rule before any stored entry is read
    if device is None:
        device = models.device if isinstance(models, MToVModels) else torch.device("cpu")
    rule = precision_plan("auto", device)
    if device.type != "cpu":
        return Calibration(rule, "rule", f"{device.type}: capability rule", key=key)
    n_params = (
        _params((m.ae_rgb, m.ae_ldmk, m.unet)) if (m := _loaded(models, loaded)) else _config_params(config)
    )
    if n_params < min_params:
        reason = f"networks of {n_params:,} parameters (< {min_params:,}) are not timed: capability rule"
        return Calibration(rule, "rule", reason, key=key)
    entry = None if recalibrate else _read(path).get("entries", {}).get(key_id)
    if entry is not None:
        try:
            seconds = _times(entry["seconds"])
            cpu = _times(entry.get("cpu_seconds") or {})
            basis = entry.get("basis", "wall")
            if basis not in ("wall", "cpu") or (basis == "cpu" and not cpu):
                raise ValueError(basis)
        except (KeyError, TypeError, ValueError, AttributeError):
            say(f"precision auto: the stored entry in {path} is damaged: measuring again")
            entry = None
    if entry is not None and entry.get("busy") and _idle():
        say("precision auto: the stored measurement was made on a busy machine, now idle: measuring again")
        entry = None
    if entry is not None:
        plan, reason = choose(cpu if basis == "cpu" else seconds, threshold)
        reason = f"{reason} [{basis} seconds]"
        cal = Calibration(plan, "cache", reason, seconds, key, str(path), cpu_seconds=cpu, basis=basis)
        say(f"precision auto on this CPU (calibrated before, {path}): {reason}")
        return cal
    m = get()
    say(f"precision auto: timing fp32 and reduced precision on this CPU (once per machine, kept in {path})")
    t0 = time.perf_counter()
    cpu: dict[str, dict[str, float]] = {}
    seconds = measure(m, timer, cpu)
    spent = time.perf_counter() - t0
    basis, times, note = _basis(seconds, cpu, torch.get_num_threads())
    plan, reason = choose(times, threshold)
    reason = f"{reason} [{note}]"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load = _load_average()
    cores = os.cpu_count() or 1
    busy = basis == "cpu" or (load is not None and load > cores + 1)
    # a busy machine's measurement is kept until a run finds the machine idle, which measures again
    entry = {"key": key, "seconds": seconds, "cpu_seconds": cpu, "basis": basis}
    entry |= {"measured_at": stamp, "load_average": load, "busy": busy}
    failed = _write(path, key_id, entry)
    where = str(path) if failed is None else None
    say(
        f"precision auto on this CPU (measured in {spent:.1f} s): {reason}"
        + (f"; not saved ({failed})" if failed else f"; saved in {path}")
    )
    if busy:
        say(
            f"precision auto: measured while other jobs ran (load average {load} on {cores} cores), so "
            "the choice may not hold on an idle machine: the first run that finds it idle measures again"
        )
    return Calibration(plan, "measured", reason, seconds, key, where, spent, cpu, basis)


def _times(times: Any) -> dict[str, dict[str, float]]:
    """Stored seconds, checked: only the networks and arithmetic :func:`measure` times, each a positive
    finite number (ValueError / TypeError / AttributeError otherwise: a damaged entry, measured again)."""
    out = {}
    for net, per in times.items():
        if net not in CANDIDATES or not set(per) <= set(CANDIDATES[net]):
            raise ValueError(f"{net}: {sorted(per)}")
        out[net] = {p: float(s) for p, s in per.items()}
        if not all(math.isfinite(s) and s > 0 for s in out[net].values()):
            raise ValueError(f"{net}: {out[net]}")
    return out


def _idle() -> bool:
    """Whether the load average is at most the number of cores and a half: this process's own threads
    may have filled the cores just before (its earlier stages), nothing else competes for them."""
    load = _load_average()
    return load is not None and load <= (os.cpu_count() or 1) + 0.5


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def resolve_plan(
    precision: str,
    models: MToVModels | Callable[[], MToVModels],
    device: torch.device,
    config: Any = None,
    **kwargs: Any,
) -> Calibration:
    """The plan of ``mtov.precision`` on ``device``: a given precision as :func:`MToV.loading.precision_plan`
    says (``fixed``); ``auto`` on the CPU by :func:`calibrate` (``kwargs``), elsewhere by the rule."""
    if precision != "auto":
        return Calibration(precision_plan(precision, device), "fixed", f"mtov.precision={precision}")
    if device.type != "cpu":
        return Calibration(precision_plan("auto", device), "rule", f"{device.type}: capability rule")
    return calibrate(models, config, device=device, **kwargs)
