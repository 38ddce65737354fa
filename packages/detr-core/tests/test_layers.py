"""Encoder/decoder layers: structure, refinement and its detach semantics, ref_point_head input, compile."""

import pytest
import torch
from torch import nn

from detr_core import box_ops
from detr_core.decoder import DeformableDecoder, DeformableDecoderLayer, look_forward_twice
from detr_core.encoder import DeformableEncoder, DeformableEncoderLayer, flatten_levels, level_start_index
from detr_core.layers import MLP
from detr_core.position_encoding import sine_embedding

C, HEADS, LEVELS = 16, 2, 2
SHAPES = torch.tensor([[4, 4], [2, 2]])
START = level_start_index(SHAPES)
S = 20


def _kw():
    return dict(d_model=C, d_ffn=32, dropout=0.0, n_levels=LEVELS, n_heads=HEADS, n_points=2)


def test_mlp_keys_and_relu():
    mlp = MLP(3, 5, 2, 3)
    assert list(mlp.state_dict()) == [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    x = torch.randn(4, 3)
    h = torch.relu(mlp.layers[1](torch.relu(mlp.layers[0](x))))
    assert torch.allclose(mlp(x), mlp.layers[2](h))


def test_encoder_layer_post_norm_formula_and_names():
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(**_kw()).eval()
    names = {n.split(".")[0] for n, _ in layer.named_parameters()}
    assert names == {"self_attn", "norm1", "linear1", "linear2", "norm2"}
    src, pos = torch.randn(2, S, C), torch.randn(2, S, C)
    ref = DeformableEncoder.get_reference_points(SHAPES, torch.ones(2, LEVELS, 2))
    out = layer(src, pos, ref, SHAPES, START)
    x = layer.norm1(src + layer.self_attn(src + pos, ref, src, SHAPES, START))
    expected = layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))
    assert torch.allclose(out, expected, atol=1e-6)


def test_encoder_stack_shapes_and_padding():
    torch.manual_seed(0)
    enc = DeformableEncoder(num_layers=2, **_kw()).eval()
    assert len(enc.layers) == 2 and enc.layers[0] is not enc.layers[1]
    src = torch.randn(2, S, C)
    pad = torch.zeros(2, S, dtype=torch.bool)
    out = enc(src, SHAPES, START, torch.ones(2, LEVELS, 2), pos=torch.randn(2, S, C), padding_mask=pad)
    assert out.shape == (2, S, C) and torch.isfinite(out).all()


def test_decoder_layer_order_and_names():
    torch.manual_seed(0)
    layer = DeformableDecoderLayer(**_kw()).eval()
    names = [n for n, _ in layer.named_children() if not n.startswith("dropout")]
    assert names == ["cross_attn", "norm1", "self_attn", "norm2", "linear1", "linear2", "norm3"]
    tgt, pos = torch.randn(2, 5, C), torch.randn(2, 5, C)
    ref = torch.rand(2, 5, LEVELS, 4) * 0.5 + 0.25
    memory = torch.randn(2, S, C)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[3:, :3] = True
    out = layer(tgt, pos, ref, memory, SHAPES, START, self_attn_mask=mask)
    q = tgt + pos
    t = layer.norm2(tgt + layer.self_attn(q, q, tgt, attn_mask=mask)[0])
    t = layer.norm1(t + layer.cross_attn(t + pos, ref, memory, SHAPES, START))
    t = layer.norm3(t + layer.linear2(torch.relu(layer.linear1(t))))
    assert torch.allclose(out, t, atol=1e-6)
    # the mask is really applied: queries 3,4 cannot see 0..2, so changing those leaves 3,4's self-attn unchanged
    tgt2 = tgt.clone()
    tgt2[:, :3] += 1.0
    a = layer.self_attn(tgt + pos, tgt + pos, tgt, attn_mask=mask)[0][:, 3:]
    b = layer.self_attn(tgt2 + pos, tgt2 + pos, tgt2, attn_mask=mask)[0][:, 3:]
    assert torch.allclose(a, b, atol=1e-6)


def _decoder(num_layers=3):
    torch.manual_seed(0)
    dec = DeformableDecoder(num_layers, **_kw()).eval()
    dec.bbox_embed = MLP(C, C, 4, 2)
    return dec


def test_decoder_refinement_matches_manual_loop_and_ref_point_head_input():
    dec = _decoder()
    b, q = 2, 5
    tgt, memory = torch.randn(b, q, C), torch.randn(b, S, C)
    ref_unsig = torch.randn(b, q, 4)
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 1.0]]])
    seen = []
    handle = dec.ref_point_head.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    inter, refs = dec(tgt, memory, ref_unsig, SHAPES, START, ratios)
    handle.remove()
    assert len(inter) == 3 and len(refs) == 4
    assert torch.allclose(refs[0], ref_unsig.sigmoid())

    out, ref = tgt, ref_unsig.sigmoid()
    r4 = torch.cat([ratios, ratios], -1)[:, None]
    for i, layer in enumerate(dec.layers):
        ref_in = ref[:, :, None] * r4
        expected_sine = sine_embedding(ref_in[:, :, 0], C // 2)
        assert torch.allclose(seen[i], expected_sine, atol=1e-6)
        out = layer(out, dec.ref_point_head(expected_sine), ref_in, memory, SHAPES, START)
        new = (dec.bbox_embed(out) + box_ops.inverse_sigmoid(ref)).sigmoid()  # un-normed output
        assert torch.allclose(refs[i + 1], new, atol=1e-6)
        assert torch.allclose(inter[i], dec.norm(out), atol=1e-6)
        ref = new


def test_refinement_detach_semantics():
    dec = _decoder()
    tgt, memory = torch.randn(1, 4, C), torch.randn(1, S, C)
    ref_unsig = torch.randn(1, 4, 4, requires_grad=True)
    inter, refs = dec(tgt, memory, ref_unsig, SHAPES, START, torch.ones(1, LEVELS, 2))
    for r in refs:
        r.retain_grad()
    # the next layer received a DETACHED reference: refs[2]'s loss does not reach refs[1]
    refs[2].sum().backward(retain_graph=True)
    assert refs[1].grad is None
    assert all(p.grad is not None for p in dec.bbox_embed.parameters())
    dec.zero_grad()

    # look forward twice: box i uses the undetached refs[i], so box 2's loss reaches refs[2] and through it the
    # bbox_embed call of layer 1 (refs[2] = f(bbox_embed(out_1), refs[1].detach()))
    boxes = look_forward_twice(inter, refs[:-1], dec.bbox_embed)
    assert len(boxes) == 3
    assert torch.allclose(boxes[0], (dec.bbox_embed(inter[0]) + box_ops.inverse_sigmoid(refs[0])).sigmoid())
    boxes[2].sum().backward()
    assert refs[2].grad is not None and refs[2].grad.abs().sum() > 0
    assert refs[1].grad is None  # two steps back is cut by the detach
    assert refs[3].grad is None  # the last reference is not used by look_forward_twice


def test_decoder_without_bbox_embed_keeps_reference():
    dec = DeformableDecoder(2, **_kw()).eval()
    ref_unsig = torch.randn(1, 3, 4)
    inter, refs = dec(
        torch.randn(1, 3, C), torch.randn(1, S, C), ref_unsig, SHAPES, START, torch.ones(1, LEVELS, 2)
    )
    assert len(refs) == 3 and all(torch.equal(r, refs[0]) for r in refs)


def test_per_layer_bbox_embed_modulelist():
    dec = _decoder(2)
    dec.bbox_embed = nn.ModuleList([MLP(C, C, 4, 2), MLP(C, C, 4, 2)])
    inter, refs = dec(
        torch.randn(1, 3, C),
        torch.randn(1, S, C),
        torch.randn(1, 3, 4),
        SHAPES,
        START,
        torch.ones(1, LEVELS, 2),
    )
    boxes = look_forward_twice(inter, refs[:-1], dec.bbox_embed)
    assert torch.allclose(
        boxes[1], (dec.bbox_embed[1](inter[1]) + box_ops.inverse_sigmoid(refs[1])).sigmoid()
    )


def _layer_and_args(kind):
    torch.manual_seed(0)
    if kind == "encoder":
        layer = DeformableEncoderLayer(**_kw()).eval()
        ref = DeformableEncoder.get_reference_points(SHAPES, torch.ones(2, LEVELS, 2))
        return layer, (torch.randn(2, S, C), torch.randn(2, S, C), ref, SHAPES, START)
    layer = DeformableDecoderLayer(**_kw()).eval()
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[3:, :3] = True
    ref = torch.rand(2, 5, LEVELS, 4) * 0.5 + 0.25
    return layer, (
        torch.randn(2, 5, C),
        torch.randn(2, 5, C),
        ref,
        torch.randn(2, S, C),
        SHAPES,
        START,
        None,
        mask,
    )


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_torch_compile_fullgraph_matches_eager(kind):
    torch._dynamo.reset()
    layer, args = _layer_and_args(kind)
    with torch.no_grad():
        eager = layer(*args)
        explanation = torch._dynamo.explain(layer)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        # aot_eager traces through dynamo + AOTAutograd like inductor but skips C++ codegen (seconds, not a minute)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert torch.allclose(compiled(*args), eager, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_torch_compile_inductor_matches_eager(kind):
    torch._dynamo.reset()
    layer, args = _layer_and_args(kind)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)
        assert torch.allclose(compiled(*args), layer(*args), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoder_and_denoising_run_on_cuda():
    from detr_core.denoising import build_denoising_queries

    dev = torch.device("cuda")
    dec = _decoder().to(dev)
    emb = nn.Embedding(3, C).to(dev)
    targets = [
        {"labels": torch.tensor([1], device=dev), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], device=dev)}
    ]
    dn = build_denoising_queries(targets, emb, 3, 4, dn_number=2)
    assert dn.content.device.type == "cuda" and dn.attn_mask.device.type == "cuda"
    tgt = torch.cat([dn.content, torch.randn(1, 4, C, device=dev)], 1)
    refs = torch.cat([dn.anchors_unsigmoid, torch.randn(1, 4, 4, device=dev)], 1)
    inter, boxes = dec(
        tgt,
        torch.randn(1, S, C, device=dev),
        refs,
        SHAPES.to(dev),
        START.to(dev),
        torch.ones(1, LEVELS, 2, device=dev),
        self_attn_mask=dn.attn_mask,
    )
    assert boxes[-1].device.type == "cuda"


def test_encoder_shapes_as_python_ints_match_the_tensor_path():
    torch.manual_seed(0)
    enc = DeformableEncoder(num_layers=2, **_kw()).eval()
    src, pos = torch.randn(2, S, C), torch.randn(2, S, C)
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 1.0]]])
    with torch.no_grad():
        ref = enc(src, SHAPES, START, ratios, pos=pos)
        out = enc(src, SHAPES, START, ratios, pos=pos, spatial_shapes_list=[(4, 4), (2, 2)])
    assert torch.equal(out, ref)


def test_encoder_exports_with_shapes_as_python_ints():
    torch.manual_seed(0)
    enc = DeformableEncoder(num_layers=2, **_kw()).eval()

    class Graph(nn.Module):
        # the level shapes are static (Python ints), the features and valid ratios are graph inputs
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, src, pos, ratios):
            shapes = [(4, 4), (2, 2)]
            spatial = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
            return self.enc(src, spatial, level_start_index(spatial), ratios, pos, None, shapes)

    src, pos = torch.randn(2, S, C), torch.randn(2, S, C)
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 1.0]]])
    with torch.no_grad():
        ep = torch.export.export(Graph(), (src, pos, ratios))
        other = torch.rand(2, LEVELS, 2) * 0.5 + 0.5
        assert torch.allclose(ep.module()(src, pos, ratios), enc(src, SHAPES, START, ratios, pos), atol=1e-5)
        assert torch.allclose(ep.module()(src, pos, other), enc(src, SHAPES, START, other, pos), atol=1e-5)


@pytest.mark.parametrize("scaled", [True, False])
def test_decoder_query_pos_source(scaled):
    torch.manual_seed(0)
    dec = DeformableDecoder(2, **_kw(), query_pos_from_scaled_reference=scaled).eval()
    dec.bbox_embed = MLP(C, C, 4, 2)
    assert dec.query_pos_from_scaled_reference is scaled
    b, q = 2, 5
    tgt, memory, ref_unsig = torch.randn(b, q, C), torch.randn(b, S, C), torch.randn(b, q, 4)
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 1.0]]])
    seen = []
    handle = dec.ref_point_head.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        inter, refs = dec(tgt, memory, ref_unsig, SHAPES, START, ratios)
    handle.remove()
    r4 = torch.cat([ratios, ratios], -1)[:, None]
    for i in range(2):
        box = refs[i][:, :, None] * r4 if scaled else refs[i][:, :, None]
        assert torch.allclose(seen[i], sine_embedding(box[:, :, 0], C // 2), atol=1e-6)
    # without padding (all ratios 1) both settings are the same model
    other = DeformableDecoder(2, **_kw(), query_pos_from_scaled_reference=not scaled).eval()
    other.bbox_embed = dec.bbox_embed
    other.load_state_dict(dec.state_dict())
    ones = torch.ones(b, LEVELS, 2)
    with torch.no_grad():
        a = dec(tgt, memory, ref_unsig, SHAPES, START, ones)
        c = other(tgt, memory, ref_unsig, SHAPES, START, ones)
        assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], c[0] + c[1]))
        # with padding they differ: the flag really switches the source
        d = other(tgt, memory, ref_unsig, SHAPES, START, ratios)
    assert not torch.allclose(inter[-1], d[0][-1])


def test_flatten_levels_layout_and_padding():
    torch.manual_seed(0)
    maps = [torch.randn(2, C, 4, 6), torch.randn(2, C, 2, 3)]
    flat = flatten_levels(maps)
    assert flat.shapes == [(4, 6), (2, 3)] and flat.padding_mask is None
    assert flat.spatial_shapes.tolist() == [[4, 6], [2, 3]] and flat.level_start_index.tolist() == [0, 24]
    assert torch.equal(flat.valid_ratios, torch.ones(2, 2, 2))
    # token (level 1, row 1, col 2) of image 1
    assert torch.equal(flat.tokens[1, 24 + 1 * 3 + 2], maps[1][1, :, 1, 2])
    pads = [torch.zeros(2, 4, 6, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    pads[0][1, :, 3:] = True  # image 1: 3 of 6 columns valid at level 0
    pads[1][1, 1:, :] = True  # image 1: 1 of 2 rows valid at level 1
    flat = flatten_levels(maps, pads)
    assert flat.padding_mask.shape == (2, 30) and flat.padding_mask[1, 24 + 3].item()
    assert torch.equal(flat.valid_ratios[1], torch.tensor([[0.5, 1.0], [1.0, 0.5]]))
    assert flatten_levels(maps, [None, None]).padding_mask is None
    with pytest.raises(ValueError):
        flatten_levels(maps, [pads[0], None])


def test_xavier_init_deformable_keeps_the_attention_init():
    from deform_attn import MSDeformAttn
    from detr_core.layers import xavier_init_deformable_

    torch.manual_seed(0)
    enc = DeformableEncoder(num_layers=1, **_kw())
    xavier_init_deformable_(enc)
    attn = enc.layers[0].self_attn
    fresh = MSDeformAttn(C, LEVELS, HEADS, 2)
    # the sampling offsets keep MSDeformAttn's own grid init (zero weight, fixed bias), not xavier
    assert torch.equal(attn.sampling_offsets.weight, torch.zeros_like(attn.sampling_offsets.weight))
    assert torch.equal(attn.sampling_offsets.bias, fresh.sampling_offsets.bias)
    bound = (6 / (C + 32)) ** 0.5
    w = enc.layers[0].linear1.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    assert isinstance(attn, MSDeformAttn)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_post_norm_ffn_cpu_inference_path_under_bf16_autocast(monkeypatch, x_dtype):
    # under CPU autocast the chunked path runs too (products in bfloat16, the residual promoted as autocast's
    # x + linear2(...) is) and agrees with the plain autocast computation to bfloat16 rounding
    from detr_core import layers

    calls = []
    fast_fn = layers._ffn_inference_cpu
    monkeypatch.setattr(layers, "_ffn_inference_cpu", lambda *a: calls.append(a[-1]) or fast_fn(*a))
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(**_kw()).eval()
    x = torch.randn(1, layers._FFN_CHUNK_ROWS + 5, C).to(x_dtype)

    def run():
        return layers.post_norm_ffn(
            x, layer.linear1, layer.activation, layer.dropout2, layer.linear2, layer.dropout3, layer.norm2
        )

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.enable_grad():
            plain = run().detach()
        assert not calls
        with torch.inference_mode():
            fast = run()
    assert calls == [torch.bfloat16]
    assert fast.dtype == plain.dtype
    # float64 of the same computation: bfloat16 inputs and weights, float32-accurate products
    bf = [t.to(torch.bfloat16).double() for t in (x, layer.linear1.weight, layer.linear1.bias)]
    hidden = torch.relu(bf[0] @ bf[1].t() + bf[2]).to(torch.bfloat16).double()
    w2, b2 = (t.to(torch.bfloat16).double() for t in (layer.linear2.weight, layer.linear2.bias))
    pre = x.double() + (hidden @ w2.t() + b2)
    expected = torch.nn.functional.layer_norm(
        pre, (C,), layer.norm2.weight.double(), layer.norm2.bias.double()
    )
    tol = 0.03 if x_dtype == torch.bfloat16 else 0.01  # a few bfloat16 steps of O(1) normalised values
    torch.testing.assert_close(fast.double(), expected, atol=tol, rtol=0)
    torch.testing.assert_close(plain.double(), expected, atol=tol, rtol=0)


def test_post_norm_ffn_cpu_inference_path_matches_autograd_path():
    # the chunked, in-place inference path (several chunks + a partial one) gives the same values as the plain one
    from detr_core import layers

    torch.manual_seed(0)
    layer = DeformableEncoderLayer(**_kw()).eval()
    x = torch.randn(2, layers._FFN_CHUNK_ROWS + 7, C)

    def run():
        return layers.post_norm_ffn(
            x, layer.linear1, layer.activation, layer.dropout2, layer.linear2, layer.dropout3, layer.norm2
        )

    expected = layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))
    with torch.enable_grad():
        slow = run()
    with torch.inference_mode():
        fast = run()
    torch.testing.assert_close(slow.detach(), expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, expected.detach(), atol=1e-6, rtol=0)
    # dropout in training mode must keep the general path (random masks) even without autograd
    layer = DeformableEncoderLayer(**(_kw() | {"dropout": 0.5})).train()
    with torch.no_grad():
        noisy = run()
    layer.eval()
    with torch.no_grad():
        assert not torch.allclose(noisy, run())
