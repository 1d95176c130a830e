"""MToV's int8 convolution (``MToV.int8.Int8Conv``): close to the float convolution for the inputs a
UNet feeds it, the same numbers for a sample whatever its batch, and the copy helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from MToV.int8 import WEIGHT_MAX, Int8Conv, PerSample, int8_convs_supported, quantize_convs

pytestmark = pytest.mark.skipif(
    not int8_convs_supported(), reason="this torch has no oneDNN int8 convolution"
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = {
    # name: (conv, input)
    "3x3, zero-mean input": (
        lambda: nn.Conv2d(32, 48, 3, padding=1),
        lambda g: torch.randn(3, 32, 12, 12, generator=g),
    ),
    "3x3 after SiLU": (
        lambda: nn.Conv2d(32, 48, 3, padding=1),
        lambda g: nn.functional.silu(torch.randn(3, 32, 12, 12, generator=g)),
    ),
    "3x3, all inputs far from 0": (
        lambda: nn.Conv2d(32, 48, 3, padding=1),
        lambda g: torch.randn(3, 32, 12, 12, generator=g) + 5,
    ),
    "strided": (
        lambda: nn.Conv2d(32, 16, 3, stride=2, padding=1),
        lambda g: torch.randn(2, 32, 11, 9, generator=g),
    ),
    "1x1 conv1d": (lambda: nn.Conv1d(32, 96, 1), lambda g: torch.randn(2, 32, 40, generator=g)),
    "no bias, wide padding": (
        lambda: nn.Conv2d(8, 8, 5, padding=2, bias=False),
        lambda g: torch.rand(2, 8, 7, 7, generator=g) * 3,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_int8_conv_is_close_to_the_float_conv(case):
    g = torch.Generator().manual_seed(0)
    make_conv, make_x = CASES[case]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        conv = make_conv()
    x = make_x(g)
    with torch.inference_mode():
        ref, out = conv(x), Int8Conv(conv)(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # 7-bit weights and 8-bit activations: about 1 % of the output's size (measured 0.9-1.4 % at full
    # size), never the 30-80 % that torch's dynamic Conv2d gives on inputs whose mean is not 0
    assert 1e-4 < _rel(out, ref) < 0.03, _rel(out, ref)


def test_int8_conv_padding_holds_real_zeros():
    # a constant input far from 0: a wrong border (the zero point instead of 0) would show at the edges
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.full((1, 4, 6, 6), 3.0)
    with torch.inference_mode():
        ref, out = conv(x), Int8Conv(conv)(x)
    edge = (ref - out)[..., 0, :].abs().max()
    assert edge < 0.03 * ref.abs().max(), edge


def test_int8_conv_gives_a_sample_the_same_numbers_in_any_batch():
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    q = Int8Conv(conv)
    # samples of very different ranges: per-call scales would let the loud one swamp the quiet one
    x = torch.cat([torch.randn(1, 16, 8, 8, generator=g), 100 * torch.randn(2, 16, 8, 8, generator=g) + 7])
    with torch.inference_mode():
        batch = q(x)
        alone = torch.cat([q(s) for s in x.split(1)])
        ref = conv(x[:1])
    assert torch.equal(batch, alone)
    assert _rel(batch[:1], ref) < 0.03


def test_int8_weights_are_7_bit_per_output_channel():
    conv = nn.Conv2d(4, 3, 3)
    with torch.no_grad():
        conv.weight[1] *= 1000  # one loud channel must not coarsen the others
    q = Int8Conv(conv)
    assert q.w_int.abs().amax(dim=(1, 2, 3)).tolist() == [WEIGHT_MAX] * 3
    deq = q.w_int.float() * q.w_scale[:, None, None, None]
    step = q.w_scale[:, None, None, None]  # per channel: max |w| / 63
    assert ((deq - conv.weight.detach()).abs() <= step / 2 + 1e-7).all()
    assert q.w_scale[1] > 100 * q.w_scale[0]
    with pytest.raises(ValueError, match="zero padding"):
        Int8Conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


def test_quantize_convs_replaces_every_conv_in_a_copy():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.SiLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1)),
        nn.Flatten(),
        nn.Linear(8 * 36, 5),
    )
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    q = quantize_convs(net)
    kinds = [type(m) for m in q.modules()]
    assert [type(m) for m in net.modules()].count(nn.Conv2d) == 2  # the original untouched
    assert kinds.count(Int8Conv) == 2 and nn.Conv2d not in kinds
    # the fp32 layers that round by batch size run one sample at a time
    wrapped = {type(m.inner) for m in q.modules() if isinstance(m, PerSample)}
    assert kinds.count(PerSample) == 2 and wrapped == {nn.GroupNorm, nn.Linear}
    with torch.inference_mode():
        out = q(x)
        assert _rel(out, net(x)) < 0.03
        assert torch.equal(out, torch.cat([q(s) for s in x.split(1)]))
