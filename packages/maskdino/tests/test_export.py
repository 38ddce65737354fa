"""torch.export and torch.compile of the inference graph (tiny preset, fixed input size)."""

from __future__ import annotations

import pytest
import torch

from maskdino.config import get_preset
from maskdino.modeling.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


class InferenceGraph(torch.nn.Module):
    """``(batch, image_sizes) -> (pred_logits, pred_masks, pred_boxes)``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, image_sizes):
        return self.model.inference_forward(batch, image_sizes)


@pytest.fixture(scope="module")
def model_and_input():
    cfg = get_preset("tiny")
    cfg.num_classes = 4
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    padded = m.preprocess(
        [torch.rand(3, 64, 64, generator=g) * 255, torch.rand(3, 50, 60, generator=g) * 255]
    )
    return m, padded.tensor, padded.image_sizes


def test_torch_export_matches_eager(model_and_input):
    m, batch, sizes = model_and_input
    with torch.no_grad():
        ref = m.inference_forward(batch, sizes)
        ep = torch.export.export(InferenceGraph(m), (batch, sizes))
        out = ep.module()(batch, sizes)
        # the exported program takes the image sizes as data: another padding layout, same graph
        other = torch.tensor([[40, 64], [64, 33]])
        torch.testing.assert_close(
            ep.module()(batch, other), m.inference_forward(batch, other), atol=1e-5, rtol=1e-5
        )
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ref[0].shape == (2, 50, 4) and ref[1].shape == (2, 50, 16, 16) and ref[2].shape == (2, 50, 4)


def test_torch_compile_smoke(model_and_input):
    # backend="eager" exercises Dynamo's capture of the whole inference path without the minutes of Inductor
    # code generation on a 2-core CPU.
    m, batch, sizes = model_and_input
    torch._dynamo.reset()
    compiled = torch.compile(m.inference_forward, backend="eager")
    with torch.no_grad():
        out = compiled(batch, sizes)
        ref = m.inference_forward(batch, sizes)
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_export_with_dynamic_height_and_width(model_and_input):
    # no size is specialised: the program exported at 64x64 runs at other multiples of 32, padded or not
    m, batch, sizes = model_and_input
    h32, w32 = torch.export.Dim("h32", min=2, max=64), torch.export.Dim("w32", min=2, max=64)
    with torch.no_grad():
        ep = torch.export.export(
            InferenceGraph(m),
            (batch, sizes),
            dynamic_shapes={"batch": {2: 32 * h32, 3: 32 * w32}, "image_sizes": {}},
        )
        g = torch.Generator().manual_seed(2)
        for shape, other_sizes in (
            ((2, 3, 96, 64), [[96, 64], [70, 50]]),
            ((2, 3, 64, 128), [[64, 100], [33, 128]]),
        ):
            x = torch.randn(*shape, generator=g)
            s = torch.tensor(other_sizes)
            for a, b in zip(ep.module()(x, s), m.inference_forward(x, s)):
                # float32 of the exported graph's decomposed operators vs eager: rounding only
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
