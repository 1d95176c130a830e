"""Device selection (the only place that names CUDA: ``--device auto|cpu|cuda|cuda:N``), what the
device can do (bf16 matrix units, AMX, int8 dot products) and which process of a launched group this is."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping

import torch

from moditalker.errors import UserError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device``; ``auto`` picks CUDA when present."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' requested but MPS is not available; use --device cpu")
    return device


def is_main_rank() -> bool:
    """True in a single process and in rank 0 of a launched group (``RANK`` from torchrun)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively: CUDA with bf16, or a CPU with bf16
    instructions (AVX512-BF16 or AMX bf16 in its flags) that oneDNN has bf16 kernels for and is not
    capped below (``ONEDNN_MAX_CPU_ISA``). oneDNN alone also answers yes on plain AVX512, where bf16 is
    emulated and slow. Where the CPU flags cannot be read, oneDNN's answer. Never by CPU name.
    On CUDA: compute capability 8.0 or later (Ampere on) of ``device`` itself (ROCm: always), not
    ``torch.cuda.is_bf16_supported()``, which also says yes where bf16 is only emulated (V100, T4) and
    asks the current device, not ``device``."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    if not onednn or _onednn_cap() in _ISA_WITHOUT_BF16:
        return False
    flags = _cpu_flags()
    return not flags or bool(flags & _BF16_FLAGS)


# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``, read case-insensitively) that leave out int8 dot products
# (VNNI), bf16 instructions, AMX; any other value, ``DEFAULT`` and unknown names too, caps nothing
_ISA_WITHOUT_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}
_ISA_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
_ISA_WITHOUT_AMX = _ISA_WITHOUT_BF16 | {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX10_2_512"}
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def _onednn_cap(max_isa: str | None = None) -> str:
    """oneDNN's ISA cap, upper case: ``max_isa``, else ``ONEDNN_MAX_CPU_ISA``, else its older name
    ``DNNL_MAX_CPU_ISA``; empty when there is none."""
    if max_isa is None:
        max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return max_isa.strip().upper()


def int8_dot_supported(cpuinfo: str | None = None, max_isa: str | None = None) -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX) that oneDNN
    may use: the CPU flags of ``/proc/cpuinfo`` (``cpuinfo``: its text, for tests), unless oneDNN is
    capped below them (``ONEDNN_MAX_CPU_ISA``, or ``max_isa``). Without them int8 convolutions add
    pairs of products in int16 and were no faster than fp32 (full-size UNet pass, oneDNN capped at
    AVX2: 1.93 against 1.97 s). False where the flags cannot be read (not Linux)."""
    return _cpu_has(_VNNI_FLAGS, _ISA_WITHOUT_VNNI, cpuinfo, max_isa)


def amx_bf16_supported(cpuinfo: str | None = None, max_isa: str | None = None) -> bool:
    """Whether this CPU has AMX bf16 tiles (flag ``amx_bf16``, Sapphire Rapids and later) that oneDNN
    may use: not capped below AMX (``ONEDNN_MAX_CPU_ISA``, or ``max_isa``) and, for this process, the
    kernel lets it use the tiles (``torch.cpu._init_amx``). The bf16 dot products of AVX512-BF16 alone
    double fp32's rate, while int8 dot products (VNNI) quadruple it: on such a CPU the whole pipeline
    ran faster with int8 autoencoders (see ``MToV.loading.precision_plan``)."""
    if not _cpu_has({"amx_bf16"}, _ISA_WITHOUT_AMX, cpuinfo, max_isa):
        return False
    if cpuinfo is not None:  # a given flags text (tests): no process to ask the kernel for
        return True
    init = getattr(torch.cpu, "_init_amx", None)
    return init is None or bool(init())


def _cpu_has(wanted: set[str], capped_out: set[str], cpuinfo: str | None, max_isa: str | None) -> bool:
    """Whether the CPU flags (``cpuinfo``'s, else this CPU's) hold one of ``wanted`` and oneDNN's cap
    (``max_isa``, else the environment) is not one of ``capped_out``, which leave those instructions out."""
    if _onednn_cap(max_isa) in capped_out:
        return False
    return bool((_cpu_flags() if cpuinfo is None else _flags_of(cpuinfo)) & wanted)


def _flags_of(cpuinfo: str) -> frozenset[str]:
    return frozenset(
        flag
        for line in cpuinfo.splitlines()
        if line.startswith("flags")
        for flag in line.partition(":")[2].split()
    )


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """This CPU's flags from ``/proc/cpuinfo`` (read once per process; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return _flags_of(f.read())
    except OSError:
        return frozenset()


# Environment that makes PyTorch run as on a CPU with fewer instructions (``--cpu-isa`` of the
# benchmark): ATen's vectorised kernels (attention, elementwise), oneDNN (convolutions; its bf16 and int8
# answers), fbgemm (the int8 linear layers) and MKL (fp32 matrix products; MKL obeys this on Intel CPUs
# only). Read by the libraries when they load, so it must be set before the process starts.
CPU_ISA_ENV: dict[str, dict[str, str]] = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
}


def cpu_isa_missing(isa: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of :data:`CPU_ISA_ENV` ``[isa]`` that ``environ`` (default: this process's) does
    not hold yet; empty when the process already runs capped (or ``isa`` is ``native``)."""
    if isa == "native":
        return {}
    if isa not in CPU_ISA_ENV:
        raise UserError(f"unknown CPU instruction set {isa!r}; use native or {', '.join(CPU_ISA_ENV)}")
    env = os.environ if environ is None else environ
    return {k: v for k, v in CPU_ISA_ENV[isa].items() if env.get(k) != v}


def cpu_isa_report() -> dict[str, object]:
    """What this process's CPU arithmetic may use, as the libraries see it (benchmark reports)."""
    return {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": _onednn_cap() or "native",
        "fbgemm": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS") or "native",
        "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS") or "native",
        "bf16": bf16_supported(torch.device("cpu")),
        "amx_bf16": amx_bf16_supported(),
        "int8_dot_products": int8_dot_supported(),
    }


def original_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """On the CPU, PyTorch's math attention backend: softmax(q k^T) v computed as the original code does,
    so HuBERT's and AToM's outputs equal the original call pattern's bit for bit (the fused kernels moved
    AToM's landmarks by 1.5e-7, enough for the renderer's whole-pixel rounding to move a landmark by one
    pixel). It cost 4 % of AToM's time there (full size, 2 threads). Elsewhere nothing changes: the
    fused kernels are much faster on a GPU."""
    if device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on ``device`` when ``dtype`` is bf16, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def allocator() -> str:
    """The memory allocator this process runs with: ``tcmalloc`` or ``jemalloc`` when one is preloaded
    (``scripts/_allocator.sh`` preloads tcmalloc where it is installed), else ``default`` (the C
    library's). Read from the libraries mapped into the process: what is in use, not what was asked."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "default"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "default"
