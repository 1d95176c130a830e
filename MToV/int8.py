"""int8 arithmetic for MToV on the CPU (``mtov.precision=int8``, and ``auto`` on CPUs without AMX).

* The autoencoders: every ``nn.Linear`` dynamically quantised with torch's own
  ``torch.ao.quantization.quantize_dynamic`` (fbgemm kernels), see :func:`quantize_linears`.
* The UNet: its convolutions (191 M of its 207 M weights, 52 % of a fp32 pass on the CPU) as
  :class:`Int8Conv`. torch has no usable dynamic-quantised convolution:
  ``torch.ao.nn.quantized.dynamic.Conv2d`` was measured 4 % off on zero-mean inputs and 30-80 % off on
  inputs whose mean is not zero (a SiLU's output, which is what every UNet convolution reads), so the
  convolution here calls oneDNN's int8 kernel (``torch.ops.onednn.qconv2d_pointwise``, the kernel that
  torch's own x86 inductor quantisation uses) with float32 output, and does the dynamic part itself.

How :class:`Int8Conv` quantises (written here; the kernel is oneDNN's):

* weights: symmetric, per output channel, **7 bits** (-63 .. 63). On x86 CPUs without VNNI (the AVX2-only
  CPUs this mode is for) the int8 kernels add pairs of u8 x s8 products in int16, which saturates for
  8-bit weights (2 x 255 x 127 > 32767); 7 bits cannot (2 x 255 x 63 < 32767). The same numbers are used
  on every CPU, so a clip's frames do not depend on whether the CPU has VNNI.
* activations: asymmetric uint8 with a scale and zero point computed **per sample** on every call, so a
  clip's result does not depend on the other clips of its batch (a per-call scale would mix them). The
  kernel takes one scale and zero point per call; it runs with a fixed zero point on input padded
  beforehand (so the padding holds each sample's zero point, a real 0), and each sample's scale and zero
  point are applied afterwards with each output channel's weight sum.
* the UNet's fp32 linear layers and group norms run one sample at a time (:class:`PerSample`), and
  :class:`Int8Conv` returns NCHW: then a clip's frames are the same in any batch, bit for bit.

Measured on a 2-core AMD EPYC (AVX512-VNNI), full-size UNet, random weights, a batch of 4 clips: one
pass 1.86-2.04 s in fp32 and 1.51-1.60 s with int8 convolutions. The frames against fp32 and the whole
pipeline are in docs/speed.md; the tests bound them on the tiny config.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import nn

__all__ = ["Int8Conv", "PerSample", "int8_convs_supported", "quantize_convs", "quantize_linears"]

WEIGHT_MAX = 63  # 7-bit symmetric weights: no int16 saturation on CPUs without VNNI (see above)


def quantize_linears(module: nn.Module) -> nn.Module:
    """An int8 copy of ``module`` for CPU inference: every ``nn.Linear`` dynamically quantised (int8
    weights, activations quantised per call), the rest unchanged; the original is not modified.

    ``torch.ao.quantization.quantize_dynamic`` is used as is: it ships with the pinned torch and its
    fbgemm kernels are what makes it fast; torch marks the API deprecated in favour of torchao, whose
    CPU path was not measured here. The deprecation warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize = torch.ao.quantization.quantize_dynamic
        return quantize(copy.deepcopy(module).cpu(), {nn.Linear}, dtype=torch.qint8)


class Int8Conv(nn.Module):
    """A ``nn.Conv2d`` or ``nn.Conv1d`` run with int8 weights and per-sample dynamically quantised
    uint8 activations (see the module docstring); float32 in, float32 out, same shapes as the conv.

    The zero padding is applied before quantising (a real 0 quantises exactly to the sample's integer
    zero point), so the kernel runs unpadded with a fixed zero point z0, and each output is
    ``s * (sum (q - z0) w + (z0 - z) * sum w) + bias``: a multiply and an add with a per-sample,
    per-channel offset, written to NCHW (the layout the fp32 layers after it see in fp32)."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("Int8Conv takes convolutions with numeric zero padding")
        w = conv.weight.detach().float().cpu()
        self.one_d = w.dim() == 3
        if self.one_d:  # a 1D convolution is a 2D one over [L, 1]
            w = w.unsqueeze(-1)
        two = (lambda v, extra: [*v, extra]) if self.one_d else (lambda v, extra: list(v))
        self.stride = two(conv.stride, 1)
        self.dilation = two(conv.dilation, 1)
        ph, pw = two(conv.padding, 0)
        self.pad = (pw, pw, ph, ph) if ph or pw else None
        self.groups = conv.groups
        scale = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / WEIGHT_MAX
        qw = torch.round(w / scale[:, None, None, None]).clamp(-WEIGHT_MAX, WEIGHT_MAX)
        self.register_buffer("w_scale", scale, persistent=False)
        self.register_buffer("w_int", qw.to(torch.int8), persistent=False)
        self.register_buffer("w_zero", torch.zeros(len(scale), dtype=torch.long), persistent=False)
        # per output channel: the dequantised weights' sum, and the bias
        self.register_buffer("w_sum", qw.sum(dim=(1, 2, 3)) * scale, persistent=False)
        bias = conv.bias.detach().float().cpu() if conv.bias is not None else torch.zeros(len(scale))
        self.register_buffer("bias", bias, persistent=False)
        # The zero point the batched call runs with: oneDNN's 1x1 kernels were 1.6x faster with a non-zero
        # one (6.9 against 11.1 ms, [4, 256, 2048] -> 768 channels), the 3x3 ones 3 % faster with 0.
        self.kernel_zero = 128 if w.shape[2] * w.shape[3] == 1 else 0
        self._packed = torch.ops.onednn.qconv_prepack(
            self.w_int, scale, 1.0, 0, self.stride, [0, 0], self.dilation, self.groups, None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_d:
            x = x.unsqueeze(-1)
        b = x.shape[0]
        flat = x.reshape(b, -1)
        lo, hi = flat.amin(1), flat.amax(1)  # (aminmax over dim 1 was 20x slower here)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # real 0 must be representable (the padding)
        scale = ((hi - lo) / 255.0).clamp_min(1e-12)
        zero = torch.round(-lo / scale)
        per = (b, 1, 1, 1)
        # x / s + z rounded (half up) and clamped to 0..255. Separate multiplies and adds, never a fused
        # addcmul: its vectorised part rounds once (FMA) and its tail twice, and where an element falls
        # depends on the batch's size. float -> uint8 goes through int16 (5x faster than directly).
        q = (x * scale.reciprocal().view(per)).add_((zero + 0.5).view(per)).clamp_(0, 255)
        q = q.to(torch.int16).to(torch.uint8)
        if self.pad is not None:  # the padding holds real zeros: each sample's zero point
            pw, ph = self.pad[0], self.pad[2]
            padded = (
                zero.to(torch.uint8)
                .view(per)
                .expand(-1, q.shape[1], q.shape[2] + 2 * ph, q.shape[3] + 2 * pw)
            )
            padded = padded.contiguous()
            padded[:, :, ph : ph + q.shape[2], pw : pw + q.shape[3]] = q
            q = padded
        # One call for the batch, with the fixed zero point z0 and scale 1 (the per-sample ones cannot be
        # passed): s * (sum (q - z0) w + (z0 - z) sum w) + bias. Every step is per element and the
        # products are summed in int32, so a sample's output does not depend on its batch, bit for bit
        # (tested).
        out = torch.ops.onednn.qconv2d_pointwise(
            q, 1.0, self.kernel_zero, self._packed, self.w_scale, self.w_zero, None,
            self.stride, [0, 0], self.dilation, self.groups,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        offset = self.bias + (scale * (self.kernel_zero - zero))[:, None] * self.w_sum  # [b, out]
        # back to NCHW in the same pass: later layers then see the layout they see in fp32 (GroupNorm picks
        # its reduction order by layout, which made a sample's numbers depend on its batch)
        out = torch.mul(out, scale.view(per), out=torch.empty(out.shape)).add_(offset[:, :, None, None])
        return out.squeeze(-1) if self.one_d else out


@functools.cache
def int8_convs_supported() -> bool:
    """Whether this torch build has oneDNN's int8 convolution (x86 CPU builds do): checked by running
    one tiny :class:`Int8Conv` against the float convolution, never by the CPU's name."""
    try:
        conv = nn.Conv2d(2, 2, 3, padding=1)
        with torch.no_grad():
            x = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(0))
            ok = torch.allclose(Int8Conv(conv)(x), conv(x), atol=0.1, rtol=0.1)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(ok)


class PerSample(nn.Module):
    """``module`` applied to one sample at a time. Some fp32 kernels round a sample differently in a
    batch than alone (a matrix product picks its kernel by the number of rows; GroupNorm splits its
    statistics by batch size): a 1e-7 change, enough to flip an int8 rounding downstream. The UNet's
    linear layers and group norms are cheap, so the int8 copy runs them per sample."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(s) for s in x.split(1)]) if x.shape[0] > 1 else self.inner(x)


def quantize_convs(module: nn.Module) -> nn.Module:
    """An int8 copy of ``module`` for CPU inference: every ``nn.Conv1d`` / ``nn.Conv2d`` replaced by
    :class:`Int8Conv`, every ``nn.Linear`` and ``nn.GroupNorm`` (fp32) run :class:`PerSample`, so that a
    sample's result does not depend on its batch; the rest unchanged; the original is not modified."""
    out = copy.deepcopy(module).cpu()
    for parent in list(out.modules()):
        if isinstance(parent, PerSample):
            continue
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Conv1d, nn.Conv2d):
                setattr(parent, name, Int8Conv(child))
            elif isinstance(child, (nn.Linear, nn.GroupNorm)):
                setattr(parent, name, PerSample(child))
    return out
