"""NNPACK Winograd 3x3 convolutions for CPU inference (``maskdino.winograd``) against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from maskdino import winograd
from maskdino.modeling.pixel_decoder import ConvNorm

pytestmark = pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="torch built without NNPACK")


@pytest.fixture
def nnpack_calls(monkeypatch):
    """Counts the calls that reach NNPACK (so a test knows which path ran)."""
    calls = []
    real = torch._nnpack_spatial_convolution

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", counting)
    return calls


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    cin=st.integers(1, 12),
    cout=st.integers(1, 12),
    h=st.integers(1, 19),
    w=st.integers(1, 19),
    pad=st.integers(0, 2),
    bias=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_winograd_matches_float64_reference(b, cin, cout, h, w, pad, bias, channels_last, seed):
    if h + 2 * pad < 3 or w + 2 * pad < 3:
        return  # no output pixel
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    bias_t = torch.randn(cout, generator=g) if bias else None
    with torch.no_grad():
        assert winograd.winograd_applies(x, weight)
        got = winograd.conv2d(x, weight, bias_t, padding=pad)
    ref = F.conv2d(x.double(), weight.double(), None if bias_t is None else bias_t.double(), padding=pad)
    assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
    # Winograd's transforms: ~1e-5 of the output's magnitude, a few times direct float32 rounding
    scale = ref.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got.double() / scale, ref / scale, atol=1e-4, rtol=0)


def test_large_map_error_is_float32_level(nnpack_calls):
    # the pixel decoder's case at a reduced size: 256 channels, 3x3, padding 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 50, 76, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(256, 256, 3, 3, generator=g) / (9 * 256) ** 0.5
    with torch.no_grad():
        got = winograd.conv2d(x, weight, None, padding=1)
    assert nnpack_calls == [(1, 256, 50, 76)]
    ref = F.conv2d(x.double(), weight.double(), padding=1)
    rel = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    direct = ((F.conv2d(x, weight, padding=1).double() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 5e-5, rel
    assert direct < rel  # it is the less exact kernel: the test would notice if NNPACK were not used


def test_falls_back_to_conv2d_exactly(nnpack_calls):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 11, 13, generator=g)
    w3 = torch.randn(8, 8, 3, 3, generator=g)
    w1 = torch.randn(8, 8, 1, 1, generator=g)
    bias = torch.randn(8, generator=g)
    cases = [
        # (why, context, weight, kwargs)
        ("autograd on", torch.enable_grad, w3, {"padding": 1}),
        ("stride 2", torch.no_grad, w3, {"padding": 1, "stride": 2}),
        ("dilation 2", torch.no_grad, w3, {"padding": 2, "dilation": 2}),
        ("1x1 kernel", torch.no_grad, w1, {}),
        ("float64", torch.no_grad, w3.double(), {"padding": 1}),
    ]
    for why, ctx, weight, kwargs in cases:
        xi = x.to(weight.dtype)
        with ctx():
            got = winograd.conv2d(xi, weight, bias.to(weight.dtype), **kwargs)
            assert torch.equal(got, F.conv2d(xi, weight, bias.to(weight.dtype), **kwargs)), why
    with torch.no_grad(), torch.backends.nnpack.flags(enabled=False):
        assert torch.equal(winograd.conv2d(x, w3, bias, padding=1), F.conv2d(x, w3, bias, padding=1))
    assert nnpack_calls == []


def test_to_contiguous_nchw():
    x = torch.randn(2, 5, 7, 3)
    for t in (
        x,
        x.contiguous(memory_format=torch.channels_last),
        x.transpose(2, 3).contiguous().transpose(2, 3),
    ):
        y = winograd.to_contiguous_nchw(t)
        assert y.is_contiguous() and torch.equal(y, x)


def test_convnorm_uses_winograd_only_in_inference(nnpack_calls):
    torch.manual_seed(0)
    m = ConvNorm(32, 32, 3, num_groups=8, relu=True).eval()
    x = torch.randn(1, 32, 20, 24)
    expected = m(x)  # autograd on: the module's own convolution
    assert nnpack_calls == []
    with torch.no_grad():
        got = m(x)
    assert len(nnpack_calls) == 1
    torch.testing.assert_close(got, expected.detach(), atol=1e-4, rtol=0)
    # the 1x1 adapter is never a Winograd candidate
    adapter = ConvNorm(32, 32, 1, num_groups=8).eval()
    with torch.no_grad():
        adapter(x)
    assert len(nnpack_calls) == 1
