"""End-to-end behaviour of the tiny model: outputs, losses, gradients, denoising, box init, padding."""

from __future__ import annotations

import re

import pytest
import torch

from maskdino.config import get_preset
from maskdino.modeling.model import MaskDINO, build_model
from maskdino.structures import Prediction

NUM_CLASSES = 5


def tiny_cfg(**decoder):
    cfg = get_preset("tiny")
    cfg.num_classes = NUM_CLASSES
    for k, v in decoder.items():
        setattr(cfg.decoder, k, v)
    return cfg


def make_targets(sizes, counts, seed=0):
    """Rectangles as masks, their xyxy boxes (x1/y1 exclusive, as COCO-style boxes of the masks)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for (h, w), n in zip(sizes, counts):
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        boxes = []
        for i in range(n):
            y0 = int(torch.randint(0, h // 2, (1,), generator=g))
            x0 = int(torch.randint(0, w // 2, (1,), generator=g))
            y1 = y0 + int(torch.randint(8, h // 2, (1,), generator=g))
            x1 = x0 + int(torch.randint(8, w // 2, (1,), generator=g))
            masks[i, y0:y1, x0:x1] = True
            boxes.append([x0, y0, x1, y1])
        targets.append(
            {
                "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                "boxes": torch.tensor(boxes, dtype=torch.float32).view(n, 4),
                "masks": masks,
            }
        )
    return targets


def images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 255 for h, w in sizes]


SIZES = [(64, 96), (48, 64)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> MaskDINO:
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def expected_loss_keys(dec_layers=3, interm=True, dn=True, dn_aux_start=0):
    base = ["loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou"]
    keys = set(base) | {f"{k}_{i}" for k in base for i in range(dec_layers)}
    if interm:
        keys |= {f"{k}_interm" for k in base}
    if dn:
        keys |= {f"{k}_dn" for k in base} | {
            f"{k}_dn_{i}" for k in base for i in range(dn_aux_start, dec_layers)
        }
    return keys


def test_training_step_losses_and_gradients(model):
    model.train()
    torch.manual_seed(1)
    losses = model(images(SIZES), make_targets(SIZES, [3, 2]))
    assert set(losses) == expected_loss_keys()
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    # weighted: the class loss carries weight 4 relative to the unweighted criterion output
    assert (
        model.criterion.weight_dict["loss_ce"] == 4.0 and model.criterion.weight_dict["loss_giou_dn_2"] == 2.0
    )
    model.zero_grad()
    sum(losses.values()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = {n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0}
    # At initialisation these get an exactly-zero gradient, by design of the official init:
    # - level_embed only feeds the sampling offsets / attention weights of MSDeformAttn, whose weights are zero;
    # - the first two layers of the shared box head sit behind its zero-initialised last layer.
    assert no_grad == {
        "pixel_decoder.transformer.level_embed",
        "predictor.decoder.bbox_embed.layers.0.weight",
        "predictor.decoder.bbox_embed.layers.0.bias",
        "predictor.decoder.bbox_embed.layers.1.weight",
        "predictor.decoder.bbox_embed.layers.1.bias",
    }
    # after one optimiser step every trainable parameter receives gradient
    with torch.no_grad():
        for p in trainable.values():
            if p.grad is not None:
                p -= 1e-3 * p.grad.sign()
    model.zero_grad()
    torch.manual_seed(2)
    sum(model(images(SIZES), make_targets(SIZES, [3, 2])).values()).backward()
    still = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert still == []
    model.zero_grad()


def test_raw_output_shapes_train_and_eval():
    torch.manual_seed(0)
    m = build_model(tiny_cfg())
    batch = m.preprocess(images(SIZES))
    assert batch.tensor.shape == (2, 3, 64, 96) and batch.image_sizes.tolist() == [[64, 96], [48, 64]]
    assert batch.masked  # padding-aware mode and the second image is padded
    q, c = 50, NUM_CLASSES
    m.eval()
    with torch.no_grad():
        out = m.network(batch)
    assert out.final.logits.shape == (2, q, c)
    assert out.final.masks.shape == (2, q, 16, 24)
    assert (
        out.final.boxes.shape == (2, q, 4) and (out.final.boxes >= 0).all() and (out.final.boxes <= 1).all()
    )
    assert len(out.aux) == 3  # initial prediction + decoder layers 0, 1
    assert all(a.masks is None for a in out.aux)  # not computed in eval mode
    assert out.interm.logits.shape == (2, q, c)
    assert out.denoising is None

    m.train()
    targets = m.prepare_targets(make_targets(SIZES, [3, 2]), batch)
    assert targets[1]["masks"].shape == (2, 64, 96) and not targets[1]["masks"][:, 48:].any()
    out = m.network(batch, targets=targets)
    dn = out.denoising
    meta = dn.meta
    assert (meta.num_groups, meta.single_pad, meta.pad_size) == (20 // 3, 3, 18)
    # unified denoising: the DN queries predict classes, boxes AND masks, on every level
    assert dn.final.logits.shape == (2, 18, c) and dn.final.masks.shape == (2, 18, 16, 24)
    assert dn.final.boxes.shape == (2, 18, 4) and len(dn.aux) == 3
    assert all(a.masks.shape == (2, 18, 16, 24) for a in dn.aux)
    assert out.final.logits.shape == (2, q, c)
    for aux in out.aux:
        assert aux.masks.shape == (2, q, 16, 24) and aux.boxes.shape == (2, q, 4)
    assert out.interm.masks.shape == (2, q, 16, 24)


def test_predict_all_tasks_shapes():
    cfg = tiny_cfg(initialize_box_type="no")
    cfg.inference.thing_classes = [0, 1, 2]
    cfg.inference.object_mask_threshold = 0.0  # random weights: keep queries so that panoptic makes segments
    torch.manual_seed(0)
    m = build_model(cfg)
    preds = m.predict(
        images(SIZES), original_sizes=[(128, 192), (40, 50)], tasks=["instance", "panoptic", "semantic"]
    )
    assert len(preds) == 2 and all(isinstance(p, Prediction) for p in preds)
    for p, (h, w) in zip(preds, [(128, 192), (40, 50)]):
        inst = p.instances
        k = len(inst)
        assert 0 < k <= 100
        assert inst.masks.shape == (k, h, w) and inst.masks.dtype == torch.bool
        assert inst.boxes.shape == (k, 4) and inst.scores.shape == (k,) and inst.labels.shape == (k,)
        assert set(inst.labels.tolist()) <= {0, 1, 2}  # panoptic models keep only things as instances
        assert p.panoptic.segments.shape == (h, w) and p.panoptic.segments.dtype == torch.int32
        ids = set(p.panoptic.segments.unique().tolist()) - {0}
        assert ids == {s["id"] for s in p.panoptic.segments_info}
        assert p.semantic.shape == (NUM_CLASSES, h, w)
    # default tasks come from cfg.inference (instance only for the tiny preset)
    (p,) = m.predict(images(SIZES[:1]))
    assert p.instances is not None and p.panoptic is None and p.semantic is None


def test_semantic_ce_variant():
    cfg = tiny_cfg(two_stage=False, initialize_box_type="no", semantic_ce_loss=True, num_queries=20)
    cfg.inference.instance_on, cfg.inference.semantic_on = False, True
    torch.manual_seed(0)
    m = build_model(cfg)
    assert m.predictor.query_feat.weight.shape == (20, 64) and m.predictor.query_embed.weight.shape == (20, 4)
    assert m.predictor.class_embed.out_features == NUM_CLASSES + 1
    m.train()
    losses = m(images(SIZES), make_targets(SIZES, [2, 1]))
    # no encoder output; the official code skips the DN loss of the first auxiliary (initial) prediction
    assert set(losses) == expected_loss_keys(interm=False, dn_aux_start=1)
    assert all(torch.isfinite(v) for v in losses.values())
    (p,) = m.predict(images(SIZES[:1]))
    assert p.semantic.shape == (NUM_CLASSES, 64, 96) and p.instances is None
    # CE model: sum over queries of softmax(C+1)[:C] x sigmoid(mask): non-negative, at most Q
    assert p.semantic.min() >= 0 and p.semantic.max() <= 20


def test_denoising_off_and_does_not_leak_into_matching_queries():
    torch.manual_seed(0)
    m = build_model(tiny_cfg())
    m.train()
    batch = m.preprocess(images(SIZES))
    targets = m.prepare_targets(make_targets(SIZES, [3, 2]), batch)
    with torch.no_grad():
        with_dn = m.network(batch, targets=targets)
        m.predictor.dn = "no"
        without = m.network(batch, targets=targets)
        m.predictor.dn = "seg"
    assert without.denoising is None and with_dn.denoising is not None
    # the attention mask hides DN queries from the matching queries: identical matching outputs
    for key in ("logits", "boxes", "masks"):
        torch.testing.assert_close(
            getattr(with_dn.final, key), getattr(without.final, key), atol=1e-4, rtol=1e-4
        )
        for a, b in zip(with_dn.aux, without.aux):
            torch.testing.assert_close(getattr(a, key), getattr(b, key), atol=1e-4, rtol=1e-4)

    cfg = tiny_cfg(dn="no")
    m2 = build_model(cfg)
    m2.train()
    losses = m2(images(SIZES), make_targets(SIZES, [3, 2]))
    assert set(losses) == expected_loss_keys(dn=False)


def test_no_targets_in_batch_still_trains():
    torch.manual_seed(0)
    m = build_model(tiny_cfg())
    m.train()
    losses = m(images(SIZES), make_targets(SIZES, [0, 0]))
    assert set(losses) == expected_loss_keys()  # DN keys padded with zeros, as the official code
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask_dn"] == 0
    sum(losses.values()).backward()


@pytest.mark.parametrize("box_type", ["no", "bitmask", "mask2box"])
def test_box_init_types_train_and_predict(box_type):
    torch.manual_seed(0)
    m = build_model(tiny_cfg(initialize_box_type=box_type))
    m.train()
    losses = m(images(SIZES), make_targets(SIZES, [2, 2]))
    assert all(torch.isfinite(v) for v in losses.values())
    m.eval()
    with torch.no_grad():
        out = m.network(m.preprocess(images(SIZES)))
    initial = out.aux[0].boxes  # the decoder's first anchors
    if box_type == "no":
        # anchors = selected proposals refined by the encoder box head (= the interm boxes)
        torch.testing.assert_close(initial, out.interm.boxes)
    else:
        assert not torch.allclose(initial, out.interm.boxes)


def _instances_close(a, b, atol=1e-4):
    assert a.labels.tolist() == b.labels.tolist()
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol * 100, rtol=0)  # pixels
    assert (a.masks != b.masks).sum() <= 0.0001 * a.masks.numel()


def test_padding_invariance():
    torch.manual_seed(0)
    m = build_model(tiny_cfg())
    m.eval()
    small, big = images([(70, 90), (100, 128)], seed=3)
    with torch.no_grad():
        ba, bb = m.preprocess([small]), m.preprocess([small, big])
        assert ba.padded_size == (96, 96) and bb.padded_size == (128, 128)  # padded in both directions
        la, ma, xa = m.inference_forward(ba.tensor, ba.image_sizes)
        lb, mb, xb = m.inference_forward(bb.tensor, bb.image_sizes)
    torch.testing.assert_close(la[0], lb[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(xa[0], xb[0], atol=1e-4, rtol=0)
    h4, w4 = 18, 23  # ceil(70 / 4), ceil(90 / 4)
    torch.testing.assert_close(ma[0, :, :h4, :w4], mb[0, :, :h4, :w4], atol=1e-4, rtol=0)
    (pa,) = m.predict([small])
    pb, _ = m.predict([small, big])
    _instances_close(pa.instances, pb.instances)

    # the official behaviour (padding = content) is not invariant: the same check must fail there
    cfg = tiny_cfg()
    cfg.padding_mode = "official"
    torch.manual_seed(0)
    official = build_model(cfg).eval()
    official.load_state_dict(m.state_dict())
    with torch.no_grad():
        la2, _, _ = official.inference_forward(ba.tensor, ba.image_sizes)
        lb2, _, _ = official.inference_forward(bb.tensor, bb.image_sizes)
    assert (la2[0] - lb2[0]).abs().max() > 1e-3


def test_padding_invariance_swin_backbone_runs_each_image_at_its_own_size(monkeypatch):
    # Swin cannot mask padding (its windows mix it into the image's tokens): in padding-aware mode each image runs
    # through the backbone at the size it has alone, so the prediction is again the same alone or in a batch
    cfg = tiny_cfg()
    cfg.backbone.name = "swin_t"
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    small, big, big2 = images([(70, 90), (100, 128), (128, 100)], seed=4)
    calls = []
    real_forward = m.backbone.forward
    monkeypatch.setattr(
        m.backbone, "forward", lambda x: calls.append(tuple(x.tensor.shape)) or real_forward(x)
    )
    with torch.no_grad():
        ba, bb = m.preprocess([small]), m.preprocess([small, big, big2])
        la, ma, xa = m.inference_forward(ba.tensor, ba.image_sizes)
        lb, mb, xb = m.inference_forward(bb.tensor, bb.image_sizes)
    # alone (96x96), then the batch: the small image at 96x96, the two others together at 128x128
    assert calls == [(1, 3, 96, 96), (1, 3, 96, 96), (2, 3, 128, 128)]
    torch.testing.assert_close(la[0], lb[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(xa[0], xb[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ma[0, :, :18, :23], mb[0, :, :18, :23], atol=1e-4, rtol=0)
    # the others equal their own unpadded runs too
    with torch.no_grad():
        bc = m.preprocess([big])
        lc, _, _ = m.inference_forward(bc.tensor, bc.image_sizes)
    torch.testing.assert_close(lc[0], lb[1], atol=1e-4, rtol=0)

    # a training step through the per-size path reaches every trainable backbone parameter
    m.train()
    targets = make_targets([(70, 90), (100, 128)], [1, 2])
    losses = m([small, big], targets)
    sum(losses.values()).backward()
    missing = [n for n, p in m.backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_unpadded_batch_skips_padding_work_with_same_outputs(monkeypatch):
    # nothing padded: the batch is not masked (no masked fills / masked GroupNorms) and must give what the
    # padding-aware graph gives with all-False masks
    torch.manual_seed(0)
    m = build_model(tiny_cfg()).eval()
    imgs = images([(64, 96), (64, 96)], seed=5)
    seen = []
    original = m._inference

    def spy(batch):
        seen.append(batch.masked)
        return original(batch)

    with torch.no_grad():
        batch = m.preprocess(imgs)
        aware = m.inference_forward(batch.tensor, batch.image_sizes)
        plain = m.inference_forward(batch.tensor, None)
        monkeypatch.setattr(m, "_inference", spy)
        preds = m.predict(imgs)
        m.predict([imgs[0], images([(50, 70)], seed=6)[0]])
    assert seen == [False, True]
    for a, b in zip(aware, plain):
        # masked GroupNorm (statistics by matrix products) vs torch's GroupNorm: two float32 summation orders, so
        # rounding relative to the output's scale, on any CPU path
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, float(b.abs().max())), rtol=0)
    assert len(preds) == 2 and preds[0].instances is not None


def test_forward_in_eval_mode_predicts(model):
    model.eval()
    (p,) = model(images(SIZES[:1]))
    assert p.instances.masks.shape[-2:] == SIZES[0]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Counts from the official layer definitions (shared/spec/official-maskdino.md).
OFFICIAL_COUNTS = {
    "coco-instance-r50-3s-d1-2048": 52_058_004,
    "coco-instance-r50-4s": 47_404_948,
    "coco-instance-r50-3s-hid1024": 43_816_436,
    "coco-panoptic-r50": 52_085_193,
    "ade20k-semantic-r50": 43_812_299,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_parameter_counts_match_official(name):
    with torch.device("meta"):
        m = build_model(get_preset(name))
    assert _count(m) == OFFICIAL_COUNTS[name]
    if name == "coco-instance-r50-3s-d1-2048":
        assert (_count(m.backbone), _count(m.pixel_decoder), _count(m.predictor)) == (
            23_454_912,
            14_055_424,
            14_547_668,
        )


@pytest.mark.parametrize("name", ["coco-instance-swinl", "coco-panoptic-swinl"])
def test_swin_presets_build(name):
    pytest.importorskip("maskdino.modeling.backbone.swin")
    with torch.device("meta"):
        m = build_model(get_preset(name))
    # README: ~223M parameters for the Swin-L models (the head is the R50 head with 5 encoder levels)
    assert 215e6 < _count(m) < 232e6


def test_official_module_names_and_aliases(model):
    keys = set(model.state_dict())
    for k in [
        "backbone.conv1.weight",
        "backbone.layer4.1.bn2.running_var",
        "pixel_decoder.input_proj.0.0.weight",
        "pixel_decoder.input_proj.2.1.bias",
        "pixel_decoder.transformer.level_embed",
        "pixel_decoder.transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
        "pixel_decoder.adapter_1.weight",
        "pixel_decoder.adapter_1.norm.weight",
        "pixel_decoder.layer_1.norm.bias",
        "pixel_decoder.mask_features.weight",
        "predictor.enc_output.weight",
        "predictor.enc_output_norm.weight",
        "predictor.class_embed.weight",
        "predictor.label_enc.weight",
        "predictor.mask_embed.layers.2.weight",
        "predictor.decoder_norm.weight",
        "predictor.decoder.layers.2.self_attn.in_proj_weight",
        "predictor.decoder.ref_point_head.layers.1.weight",
        "predictor.bbox_embed.layers.2.bias",
    ]:
        assert k in keys, k
    assert model.predictor.decoder_norm is model.predictor.decoder.norm
    assert model.predictor.bbox_embed is model.predictor.decoder.bbox_embed
    assert not any(re.search(r"pixel_mean|pixel_std", k) for k in keys)
    # the last box layer is zero-initialised (official)
    assert model.predictor.bbox_embed.layers[-1].weight.abs().sum() >= 0


def test_autocast_training_step_is_finite(skip_if_aten_capability_forced_on_amx):
    # under bfloat16 autocast the encoder and decoder run in bfloat16, the deformable attention op with a bfloat16
    # value and float32 locations (its own autocast rule); losses and gradients stay finite
    torch.manual_seed(0)
    m = build_model(tiny_cfg())
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(images(SIZES), make_targets(SIZES, [2, 1]))
    assert set(losses) == expected_loss_keys()
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_train_step_and_cpu_parity():
    torch.manual_seed(0)
    cpu = build_model(tiny_cfg()).eval()
    gpu = build_model(tiny_cfg()).to("cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    ims = images(SIZES)
    with torch.no_grad():
        bc, bg = cpu.preprocess(ims), gpu.preprocess([im.cuda() for im in ims])
        ref = cpu.inference_forward(bc.tensor, bc.image_sizes)
        out = gpu.inference_forward(bg.tensor, bg.image_sizes)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b.cpu(), a, atol=2e-3, rtol=2e-3)
    gpu.train()
    losses = gpu(ims, make_targets(SIZES, [3, 2]))  # inputs on the CPU are moved by the model
    assert all(v.is_cuda and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
