"""Swin backbone: parameter count (hand formula), official key layout, shapes, window attention semantics."""

from __future__ import annotations

import itertools

import pytest
import torch

from maskdino.modeling.backbone.swin import (
    SwinTransformer,
    SwinTransformerBlock,
    build_swin,
    build_swin_backbone,
    merge_patches,
    relative_position_index,
)


def swin_param_count(embed_dim, depths, heads, window, patch=4, in_chans=3):
    """Hand formula of the official layout (parameters only, buffers excluded)."""
    c0 = embed_dim
    total = in_chans * patch * patch * c0 + c0 + 2 * c0  # patch_embed.proj (+bias) + patch_embed.norm
    for i, (d, h) in enumerate(zip(depths, heads)):
        c = c0 * 2**i
        # block: norm1 2C, qkv 3C^2+3C, proj C^2+C, norm2 2C, fc1 4C^2+4C, fc2 4C^2+C, bias table
        block = 12 * c * c + 13 * c + (2 * window - 1) ** 2 * h
        total += d * block
        if i < len(depths) - 1:
            total += 8 * c + 8 * c * c  # downsample.norm(4C) + reduction 4C->2C no bias
        total += 2 * c  # norm{i}
    return total


def test_swin_param_count():
    model = build_swin("tiny")
    n = sum(p.numel() for p in model.parameters())
    assert n == swin_param_count(96, (2, 2, 6, 2), (3, 6, 12, 24), 7)
    # Cross-check with the published Swin-T classifier size (28,288,354 = backbone + final LayerNorm(768)
    # + Linear(768, 1000)): our backbone has norm0..3 instead of the single final norm.
    norms = 2 * (96 + 192 + 384 + 768)
    assert n - norms + 2 * 768 + 768 * 1000 + 1000 == 28_288_354


def official_swin_keys(depths, with_downsample=True):
    """Every state-dict key of the official D2SwinTransformer (ape False, patch_norm True), listed by hand."""
    keys = [
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "patch_embed.norm.weight",
        "patch_embed.norm.bias",
    ]
    for i, d in enumerate(depths):
        for j in range(d):
            p = f"layers.{i}.blocks.{j}."
            keys += [
                p + "norm1.weight",
                p + "norm1.bias",
                p + "attn.relative_position_bias_table",
                p + "attn.relative_position_index",
                p + "attn.qkv.weight",
                p + "attn.qkv.bias",
                p + "attn.proj.weight",
                p + "attn.proj.bias",
                p + "norm2.weight",
                p + "norm2.bias",
                p + "mlp.fc1.weight",
                p + "mlp.fc1.bias",
                p + "mlp.fc2.weight",
                p + "mlp.fc2.bias",
            ]
        if i < len(depths) - 1:
            keys += [
                f"layers.{i}.downsample.reduction.weight",
                f"layers.{i}.downsample.norm.weight",
                f"layers.{i}.downsample.norm.bias",
            ]
    for i in range(len(depths)):
        keys += [f"norm{i}.weight", f"norm{i}.bias"]
    return keys


def test_swin_large_key_layout_and_shapes():
    with torch.device("meta"):
        model = build_swin("large")
    sd = model.state_dict()
    assert sorted(sd) == sorted(official_swin_keys((2, 2, 18, 2)))
    assert sd["patch_embed.proj.weight"].shape == (192, 3, 4, 4)
    assert sd["layers.2.blocks.17.attn.relative_position_bias_table"].shape == (23 * 23, 24)
    assert sd["layers.0.blocks.0.attn.relative_position_index"].shape == (144, 144)
    assert sd["layers.3.blocks.1.mlp.fc1.weight"].shape == (4 * 1536, 1536)
    assert sd["layers.2.downsample.reduction.weight"].shape == (1536, 4 * 768)
    assert sd["norm3.weight"].shape == (1536,)
    assert model.window_size == 12 and model.pretrain_img_size == 384
    assert model.out_channels == {"res2": 192, "res3": 384, "res4": 768, "res5": 1536}
    assert model.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    n = sum(p.numel() for p in model.parameters())
    assert n == swin_param_count(192, (2, 2, 18, 2), (6, 12, 24, 48), 12)


def test_relative_position_index_by_loops():
    w = 3
    idx = relative_position_index(w)
    for (r1, c1), (r2, c2) in itertools.product(itertools.product(range(w), repeat=2), repeat=2):
        expected = (r1 - r2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1)
        assert idx[r1 * w + c1, r2 * w + c2] == expected


def test_merge_patches_order_and_padding():
    x = torch.arange(2 * 3 * 1, dtype=torch.float32).view(1, 2, 3, 1)  # H=2, W=3 (odd, gets padded)
    out = merge_patches(x)
    assert out.shape == (1, 1, 2, 4)
    # (0,0), (1,0), (0,1), (1,1) of each 2x2 patch; the padded column is zero
    assert out[0, 0, 0].tolist() == [0.0, 3.0, 1.0, 4.0]
    assert out[0, 0, 1].tolist() == [2.0, 5.0, 0.0, 0.0]


def test_forward_shapes_with_padding():
    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4).eval()
    x = torch.randn(2, 3, 70, 90)  # not a multiple of patch, window or 32
    with torch.no_grad():
        out = model(x)
    assert list(out) == ["res2", "res3", "res4", "res5"]
    assert out["res2"].shape == (2, 16, 18, 23)
    assert out["res3"].shape == (2, 32, 9, 12)
    assert out["res4"].shape == (2, 64, 5, 6)
    assert out["res5"].shape == (2, 128, 3, 3)
    # batch independence
    with torch.no_grad():
        single = model(x[1:])
    torch.testing.assert_close(single["res5"], out["res5"][1:], atol=1e-5, rtol=1e-4)
    # out_features subset keeps only those norms and outputs
    sub = SwinTransformer(
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 2, 4),
        window_size=4,
        out_features=("res3", "res5"),
    )
    assert not hasattr(sub, "norm0") and hasattr(sub, "norm3")
    assert list(sub(x[:1])) == ["res3", "res5"]


def naive_window_block(blk: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """One window covering the whole (unshifted) map: plain multi-head attention with the bias table
    indexed by explicit (dr, dc) offsets."""
    b, h, w, c = x.shape
    ws = blk.window_size
    assert h == w == ws and blk.shift_size == 0
    heads = blk.attn.num_heads
    y = blk.norm1(x).reshape(b, h * w, c)
    q, k, v = blk.attn.qkv(y).chunk(3, -1)
    q, k, v = (t.view(b, h * w, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * (c // heads) ** -0.5
    table = blk.attn.relative_position_bias_table
    bias = torch.empty(heads, h * w, h * w)
    for i in range(h * w):
        for j in range(h * w):
            dr, dc = i // w - j // w, i % w - j % w
            bias[:, i, j] = table[(dr + ws - 1) * (2 * ws - 1) + dc + ws - 1]
    att = (logits + bias).softmax(-1) @ v
    y = blk.attn.proj(att.transpose(1, 2).reshape(b, h, w, c))
    x = x + y
    return x + blk.mlp(blk.norm2(x))


def test_window_attention_matches_naive_single_window():
    torch.manual_seed(0)
    blk = SwinTransformerBlock(dim=8, num_heads=2, window_size=3, shift_size=0).eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()
        x = torch.randn(2, 3, 3, 8)
        torch.testing.assert_close(blk(x, None), naive_window_block(blk, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, 2])
def test_window_locality_with_and_without_shift(shift):
    # A change of token (0, 0) may only reach the tokens of its own window: the top-left 4x4 window
    # without shift; with shift s the wrapped-around corner region [0, s) x [0, s) (mask -100 elsewhere).
    from maskdino.modeling.backbone.swin import shifted_window_mask

    torch.manual_seed(0)
    ws = 4
    blk = SwinTransformerBlock(dim=8, num_heads=2, window_size=ws, shift_size=shift).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0.0, 0.5)  # the default std 0.02 makes cross-token effects too small to see
        blk.attn.qkv.weight[:8].zero_()  # zero queries: uniform attention over every allowed key
        blk.attn.qkv.bias[:8].zero_()
        blk.attn.relative_position_bias_table.zero_()
    x = torch.randn(1, 8, 8, 8)
    mask = shifted_window_mask(8, 8, ws, shift, x.device) if shift else None
    x2 = x.clone()
    x2[0, 0, 0, 0] += 1.0  # one channel: LayerNorm ignores a shift of all channels
    with torch.no_grad():
        changed = (blk(x2, mask) - blk(x, mask)).abs().amax(-1)[0] > 1e-4
    reach = shift if shift else ws
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:reach, :reach] = True
    assert torch.equal(changed, expected)


def test_build_from_backbone_config_and_pretrained_loading(tmp_path):
    from detr_core.backbone import ShapeSpec
    from maskdino.config import BackboneConfig
    from maskdino.modeling.backbone.swin import load_swin_pretrained

    with torch.device("meta"):
        model = build_swin_backbone(BackboneConfig(name="swin_l", out_features=["res3", "res4", "res5"]))
    assert model.output_shape() == {
        "res3": ShapeSpec(384, 8),
        "res4": ShapeSpec(768, 16),
        "res5": ShapeSpec(1536, 32),
    }
    assert model.supports_padding_mask is False

    # An ImageNet checkpoint of the Swin repo: classifier head, final norm and attn_mask buffers are ignored.
    torch.manual_seed(0)
    kw = dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2, out_features=("res2", "res3"))
    src = SwinTransformer(**kw)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("norm")}
    sd |= {
        "head.weight": torch.zeros(3, 16),
        "norm.weight": torch.ones(16),
        "layers.0.blocks.1.attn_mask": torch.zeros(1),
    }
    torch.save({"model": sd}, tmp_path / "swin.pth")
    dst = SwinTransformer(**kw)
    load_swin_pretrained(dst, str(tmp_path / "swin.pth"))
    torch.testing.assert_close(dst.layers[1].blocks[1].mlp.fc2.weight, src.layers[1].blocks[1].mlp.fc2.weight)
    del sd["layers.1.blocks.1.mlp.fc2.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="layers.1.blocks.1.mlp.fc2.weight"):
        load_swin_pretrained(dst, str(tmp_path / "bad.pth"))
