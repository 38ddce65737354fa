import torch

import deform_attn


def test_module_matches_reference_op():
    torch.manual_seed(0)
    m = deform_attn.MSDeformAttn(32, 2, 4, 2).double()
    shapes = torch.tensor([[4, 5], [2, 3]])
    start = torch.tensor([0, 20])
    q, v = torch.randn(2, 7, 32, dtype=torch.float64), torch.randn(2, 26, 32, dtype=torch.float64)
    out = m(q, torch.rand(2, 7, 2, 2, dtype=torch.float64), v, shapes, start)
    assert out.shape == (2, 7, 32)
    assert torch.isfinite(out).all()
