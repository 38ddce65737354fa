"""Our model in ``padding_mode="official"`` against outputs recorded from the official Mask DINO code.

``data/official_tiny_parity.pt`` was written by ``python -m tools.compare_official --record-fixture PATH`` (see
tools/README.md): it built the official model (IDEA-Research/MaskDINO on detectron2, pure-PyTorch deformable
attention) from its COCO instance R50 yaml with :data:`OFFICIAL_OVERRIDES` (a ResNet-18, pixel decoder width 64,
2 encoder and 3 decoder layers, 30 queries), loaded the weights :func:`official_weights` makes from its key list, ran
it in eval mode on :func:`parity_input` (a synthetic photo after a scaled-down standard test resize, 150x200, padded
to 160x224) and stored its raw outputs. Only the official OUTPUTS and the key list with shapes are stored: the
weights are regenerated here from a seed, with draws that are bit-identical on every CPU (uniform float64 from
torch's CPU generator, no transcendental functions), and so is the input (integer arithmetic, PIL's fixed-point
resize; its hash is stored).

The test converts those weights with our converter, loads them strictly and compares every raw output (final logits /
boxes / masks, the auxiliary logits / boxes, the encoder proposals' logits / boxes / masks) with the recorded one.
Tolerance: float32 rounding on another CPU (another summation order in convolutions and matmuls),
``|ours - official| <= 1e-4 * max|official|`` per tensor, as tools/compare_official; on the recording machine the
largest difference is 4.5e-6 of the maximum, with the AVX2 and the generic kernels
(``ATEN_CPU_CAPABILITY=avx2|default``, ``ONEDNN_MAX_CPU_ISA=AVX2``) at most 5.1e-6. The recorder checked that no
decision of the forward is within reach of that tolerance (the gap at the 30th encoder token score, the
mask-to-box thresholds), and the queries are matched by their selected encoder token (their proposal output) if
near-equal scores come out in another order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import Tensor

from detr_core.checkpoint import load_into_model, match_aliases
from maskdino.checkpoints import ALIASES, convert_official_state_dict
from maskdino.config import BackboneConfig, DecoderConfig, MaskDINOConfig, PixelDecoderConfig
from maskdino.data.transforms import ResizeShortestEdge
from maskdino.modeling.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "data" / "official_tiny_parity.pt"

#: the official config the fixture was recorded with: this yaml of the MaskDINO checkout, then these overrides.
OFFICIAL_YAML = "configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml"
OFFICIAL_OVERRIDES = {
    "MODEL.RESNETS.DEPTH": 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 64,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 64,
    "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD": 128,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 2,
    "MODEL.MaskDINO.NUM_OBJECT_QUERIES": 30,
    "MODEL.MaskDINO.NHEADS": 4,
    "MODEL.MaskDINO.DEC_LAYERS": 3,
    "MODEL.MaskDINO.DIM_FEEDFORWARD": 128,
}
#: the same as detectron2's ``cfg.merge_from_list`` argument.
OFFICIAL_OPTS = [str(x) for item in OFFICIAL_OVERRIDES.items() for x in item]
WEIGHT_SEED = 0
IMAGE_SEED = 0
#: the standard COCO test resize (shortest edge 800, longest at most 1333) scaled down 16/3 times.
TEST_RESIZE = (150, 250)
RTOL_OF_MAX = 1e-4


def our_config(padding_mode: str = "official") -> MaskDINOConfig:
    """Our config of the recorded official model (the yaml's defaults plus :data:`OFFICIAL_OPTS`)."""
    cfg = MaskDINOConfig(padding_mode=padding_mode)  # type: ignore[arg-type]
    cfg.backbone = BackboneConfig(name="resnet18")
    cfg.pixel_decoder = PixelDecoderConfig(
        conv_dim=64, mask_dim=64, num_encoder_layers=2, dim_feedforward=128, nheads=4, n_points=4
    )
    # the official decoder needs hidden_dim 256 (its sine embedding of the boxes is 4 x 128 wide) and always has 8
    # heads (MaskDINO.NHEADS sets the encoder's only); conv_dim 64 != 256 adds the decoder's 1x1 input projections
    cfg.decoder = DecoderConfig(hidden_dim=256, num_queries=30, nheads=8, dec_layers=3, dim_feedforward=128)
    cfg.validate()
    return cfg


def _scale(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(offset, half-width)`` of the uniform values of one official tensor (see :func:`official_weights`)."""
    norm = ".norm." in key and key.startswith("backbone.")  # FrozenBN of the ResNet
    if norm and key.endswith("running_var"):
        return 1.25, 0.75  # [0.5, 2]
    if norm and key.endswith("running_mean"):
        return 0.0, 0.1
    if norm and key.endswith("weight"):
        # a small gamma on the last norm of each residual branch (conv2 of a ResNet-18 basic block) keeps a random
        # ResNet from blowing up
        return (0.25, 0.15) if ".conv2.norm." in key else (1.0, 0.5)
    if len(shape) >= 2:  # convolutions, linear layers, embeddings: variance 1 / fan-in
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return 0.0, (3.0 / fan_in) ** 0.5
    if key.endswith("weight"):  # GroupNorm / LayerNorm gammas
        return 1.0, 0.1
    return 0.0, 0.1 if norm else 0.02  # biases


def official_weights(
    keys: list[tuple[str, tuple[int, ...], str | None]], seed: int = WEIGHT_SEED
) -> dict[str, Tensor]:
    """The official state dict of the fixture, from its key list ``(key, shape, tied_to)``.

    For each key in sorted order that is not tied to another: ``offset + half_width * (2 u - 1)`` with ``u`` uniform
    in [0, 1) drawn in float64 from ``torch.Generator().manual_seed(seed)`` and rounded to float32; offset and width
    by :func:`_scale` (FrozenBN variances in [0.5, 2], means and betas +-0.1, gammas around 1 except the last norm of
    each residual branch around 0.25, weight matrices of variance 1 / fan-in, other norms' gammas 1 +- 0.1, biases
    +-0.02). A tied key (the official state dict repeats shared modules under several names) gets its source's
    tensor.
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    ties = {}
    for key, shape, tied_to in sorted(keys):
        if tied_to is not None:
            ties[key] = tied_to
            continue
        offset, half = _scale(key, tuple(shape))
        u = torch.rand(tuple(shape), generator=g, dtype=torch.float64)
        out[key] = (offset + half * (2 * u - 1)).float()
    for key, src in ties.items():
        out[key] = out[src]
    return out


def parity_image(seed: int = IMAGE_SEED) -> Tensor:
    """A 300x400 RGB uint8 "photo" made with integer arithmetic only (identical on every machine): 6x8 random
    colour blocks with a diagonal ramp, three rectangles, a disc and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    h, w = 300, 400
    img = torch.randint(0, 200, (3, 6, 8), generator=g).repeat_interleave(50, 1).repeat_interleave(50, 2)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = img + (yy + xx) // 16
    for _ in range(3):
        y0, x0 = (int(v) for v in torch.randint(0, 200, (2,), generator=g))
        dy, dx = (int(v) for v in torch.randint(30, 120, (2,), generator=g))
        img[:, y0 : y0 + dy, x0 : x0 + dx] = torch.randint(0, 256, (3, 1, 1), generator=g)
    disc = (yy - 180) ** 2 + (xx - 120) ** 2 < 45**2
    img[:, disc] = torch.tensor([250, 30, 60])[:, None]
    img = img + torch.randint(-8, 9, img.shape, generator=g)
    return img.clamp(0, 255).to(torch.uint8)


def parity_input() -> Tensor:
    """:func:`parity_image` after the test resize with PIL bilinear on uint8 (detectron2's): ``(3, 150, 200)`` float
    in [0, 255]; padded to 160x224 by the model."""
    resize = ResizeShortestEdge(*TEST_RESIZE, backend="pil")
    from torchvision import tv_tensors

    return resize({"image": tv_tensors.Image(parity_image())})["image"].as_subclass(Tensor).float()


# ------------------------------------------------------------------------------------------------ helpers


def _fixture() -> dict:
    if not FIXTURE.exists():
        pytest.fail(
            f"{FIXTURE} is missing (record it with python -m tools.compare_official --record-fixture)"
        )
    return torch.load(FIXTURE, weights_only=True)


def _model(padding_mode: str, sd: dict[str, Tensor]):
    model = build_model(our_config(padding_mode))
    converted = match_aliases(convert_official_state_dict(sd), model.state_dict().keys(), ALIASES)
    report = load_into_model(model, converted, strict=True)
    assert report.ok
    return model.eval()


def _levels(out) -> dict[str, Tensor]:
    """``{"final.logits": ..., "aux0.boxes": ..., "interm.logits": ...}`` of a DetectionOutputs."""
    flat: dict[str, Tensor] = {}
    named = [("final", out.final), *[(f"aux{i}", a) for i, a in enumerate(out.aux)], ("interm", out.interm)]
    for name, level in named:
        for field, t in level.tensors():
            flat[f"{name}.{field}"] = t
    return flat


def _align(ours: dict[str, Tensor], ref: dict[str, Tensor], tol: float) -> Tensor:
    """Per image, the order of our queries that matches the official ones: each two-stage query is one selected
    encoder token and its proposal output (class logits and box) identifies it. Identity when the order agrees."""
    fo = torch.cat([ref["interm.logits"], ref["interm.boxes"]], -1).double()
    fu = torch.cat([ours["interm.logits"], ours["interm.boxes"]], -1).double()
    perms = []
    for b in range(fo.shape[0]):
        best, perm = torch.cdist(fo[b], fu[b], p=float("inf")).min(1)
        assert perm.unique().numel() == perm.numel(), (
            "the selected encoder tokens differ from the official ones"
        )
        assert float(best.max()) <= tol * float(fo[b].abs().max()), "a selected token's proposal differs"
        perms.append(perm)
    return torch.stack(perms)


def _permute(flat: dict[str, Tensor], perm: Tensor) -> dict[str, Tensor]:
    return {k: torch.stack([t[b, p] for b, p in enumerate(perm)]) for k, t in flat.items()}


def _max_rel(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|``."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------------ tests


def test_fixture_describes_this_test():
    fx = _fixture()
    assert fx["official_yaml"] == OFFICIAL_YAML and list(fx["official_opts"]) == OFFICIAL_OPTS
    assert (fx["weight_seed"], fx["image_seed"]) == (WEIGHT_SEED, IMAGE_SEED)
    x = parity_input()
    assert tuple(x.shape) == (3, 150, 200) == (3, *fx["image_size"])
    # the input is regenerated exactly (integer image, PIL's fixed-point resize)
    assert hashlib.sha256(x.to(torch.uint8).numpy().tobytes()).hexdigest() == fx["input_sha256"]


def test_official_mode_matches_the_recorded_official_outputs():
    fx = _fixture()
    model = _model("official", official_weights(fx["keys"]))
    with torch.no_grad():
        batch = model.preprocess([parity_input()])
        assert batch.padded_size == tuple(fx["padded_size"]) == (160, 224)
        ours = _levels(model.network(batch))
    ref = fx["outputs"]
    assert set(ref) <= set(ours), f"missing outputs: {sorted(set(ref) - set(ours))}"
    ours = _permute(ours, _align(ours, ref, RTOL_OF_MAX))
    bad = {k: _max_rel(ours[k], ref[k]) for k in ref if _max_rel(ours[k], ref[k]) > RTOL_OF_MAX}
    assert not bad, f"outputs beyond float32 rounding of the official ones (max|diff| / max|official|): {bad}"


def test_aware_mode_differs_on_padded_input_and_not_without_padding():
    fx = _fixture()
    sd = official_weights(fx["keys"])
    official, aware = _model("official", sd), _model("aware", sd)
    x = parity_input()
    with torch.no_grad():
        padded_aware = _levels(aware.network(aware.preprocess([x])))
        # no padding at all (a crop of multiples of 32): both modes compute the same thing
        crop = [x[:, :128, :192]]
        plain_official = _levels(official.network(official.preprocess(crop)))
        plain_aware = _levels(aware.network(aware.preprocess(crop)))
    ref = fx["outputs"]
    # with padding, aware mode masks it (backbone, pixel decoder, decoder): the outputs move far beyond rounding
    assert _max_rel(padded_aware["final.logits"], ref["final.logits"]) > 100 * RTOL_OF_MAX
    for key in ("final.logits", "final.boxes", "final.masks"):
        assert _max_rel(plain_aware[key], plain_official[key]) <= RTOL_OF_MAX, key
