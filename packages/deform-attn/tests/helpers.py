"""Random inputs for the deform_attn tests."""

from __future__ import annotations

import torch
from torch import Tensor


def level_table(shapes: list[tuple[int, int]], device: str = "cpu") -> tuple[Tensor, Tensor, int]:
    """(spatial_shapes (L, 2), level_start_index (L,), S) for a list of (H, W)."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device).view(-1, 2)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, starts, int(sizes.sum())


def make_inputs(
    shapes: list[tuple[int, int]],
    n: int = 2,
    q: int = 5,
    m: int = 2,
    d: int = 3,
    p: int = 2,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    margin: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """value (n, S, m, d), spatial_shapes, level_start_index, locations (n, q, m, L, p, 2) uniform in
    [-margin, 1 + margin] (so some samples fall partly or wholly outside), weights (n, q, m, L, p)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, starts, s = level_table(shapes)
    num_levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, q, m, num_levels, p, 2, generator=g, dtype=torch.float64) * (1 + 2 * margin) - margin
    attn = torch.rand(n, q, m, num_levels, p, generator=g, dtype=torch.float64)
    cast = dict(dtype=dtype, device=device)
    return value.to(**cast), spatial_shapes.to(device), starts.to(device), loc.to(**cast), attn.to(**cast)


def grads(fn, inputs: tuple[Tensor, ...], grad_out: Tensor | None = None, seed: int = 1) -> list[Tensor]:
    """[output, d value, d locations, d weights] of fn under a random output gradient."""
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def assert_close_rel(actual: Tensor, expected: Tensor, rtol: float, what: str = "") -> None:
    """Max-abs error relative to the largest expected magnitude (robust to tiny entries)."""
    scale = expected.abs().max().clamp_min(1e-30).double()
    err = ((actual.double() - expected.double()).abs().max() / scale).item() if expected.numel() else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


# Unit roundoff u of each dtype (half the machine epsilon): one round-to-nearest of a value x errs by at
# most u * |x|.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def tolerance(dtype: torch.dtype) -> float:
    """Max error relative to the largest expected magnitude for a result stored in ``dtype``, against the
    float64 reference evaluated on the same (already rounded) inputs.

    The kernels accumulate in float32 (float64 for float64) and round each result once to its dtype: at most
    u(dtype) relative to the element, so at most u relative to the largest one; we allow 2 u. Accumulating
    the ~L * P * 4 corner terms in float32 adds about n * 2^-24 times (sum of |terms|) / max|result|, which
    for these tests' sizes (n <= ~200, ratio <= ~5) is below 2e-5: the float32 budget, added to every
    16-bit one. float64: the same argument with 2^-53 gives far below 1e-10."""
    if dtype == torch.float64:
        return 1e-10
    return 2 * UNIT_ROUNDOFF[dtype] + 2e-5 if dtype != torch.float32 else 2e-5


def cast_inputs(
    inputs: tuple[Tensor, ...], value_dtype: torch.dtype, loc_dtype: torch.dtype
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(inputs in the given dtypes, the same rounded values in float64 for the reference)."""
    value, shapes, starts, loc, attn = inputs
    cast = (value.to(value_dtype), shapes, starts, loc.to(loc_dtype), attn.to(loc_dtype))
    exact = tuple(t.double() if t.is_floating_point() else t for t in cast)
    return cast, exact
