"""Swin Transformer backbone (Liu et al., 2021) with the parameter layout of the official Mask DINO /
Mask2Former ``D2SwinTransformer``, so their checkpoints load by name.

State-dict keys (``i`` = stage 0..3, ``j`` = block)::

    patch_embed.proj.{weight,bias}            Conv2d(3, C, 4, stride 4)
    patch_embed.norm.{weight,bias}            LayerNorm(C)
    layers.{i}.blocks.{j}.norm1 / norm2       LayerNorm
    layers.{i}.blocks.{j}.attn.qkv            Linear(C_i, 3 C_i)
    layers.{i}.blocks.{j}.attn.proj           Linear(C_i, C_i)
    layers.{i}.blocks.{j}.attn.relative_position_bias_table   ((2w-1)^2, heads)
    layers.{i}.blocks.{j}.attn.relative_position_index        (w^2, w^2) int64 buffer
    layers.{i}.blocks.{j}.mlp.fc1 / fc2       Linear(C_i, 4 C_i) / Linear(4 C_i, C_i)
    layers.{i}.downsample.norm / reduction    LayerNorm(4 C_i), Linear(4 C_i, 2 C_i, bias=False)  (i < 3)
    norm{i}                                   LayerNorm(C_i) on each output

Behaviour kept for parity with the official weights: the input is zero-padded to a multiple of the
patch size; inside each block the (normed) tokens are zero-padded to a multiple of the window size and
the padded tokens take part in attention as keys; shifted windows mask cross-region pairs with -100;
patch merging concatenates the 2x2 neighbours in the order (0,0), (1,0), (0,1), (1,1) (row, col).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor, nn

from detr_core.backbone import ShapeSpec
from detr_core.padding import PaddedBatch

from ...config.model import BackboneConfig

__all__ = ["SWIN_VARIANTS", "SwinTransformer", "build_swin", "build_swin_backbone"]

# name -> (embed_dim, depths, num_heads); window / pretrain size are separate (224/7 or 384/12).
SWIN_VARIANTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def relative_position_index(window_size: int) -> Tensor:
    """``(w*w, w*w)`` int64 index into the ``(2w-1)^2`` bias table for every (query, key) token pair.

    Token ``t = r * w + c``; the pair's offset ``(dr, dc)`` in ``[-(w-1), w-1]^2`` is flattened
    row-major as ``(dr + w - 1) * (2w - 1) + (dc + w - 1)``.
    """
    w = window_size
    rows = torch.arange(w).repeat_interleave(w)
    cols = torch.arange(w).repeat(w)
    dr = rows[:, None] - rows[None, :] + (w - 1)
    dc = cols[:, None] - cols[None, :] + (w - 1)
    return dr * (2 * w - 1) + dc


class Mlp(nn.Module):
    """Token-wise feed-forward ``fc2(gelu(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows with a learned relative position bias."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent: the official checkpoints store it, so strict loading expects it.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    relative_position_index: Tensor

    def relative_bias(self) -> Tensor:
        """``(heads, N, N)`` bias, ``N = window_size**2``."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            x: ``(B, nW, N, C)`` tokens of ``nW`` windows of ``N`` tokens.
            mask: ``(nW, N, N)`` additive mask (0 or -100) or None.

        Returns:
            ``(B, nW, N, C)``.
        """
        b, nw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)  # 3, B, nW, h, N, d
        bias = self.relative_bias().to(x.dtype)[None]  # 1, h, N, N
        if mask is not None:
            bias = bias + mask[:, None].to(x.dtype)  # nW, h, N, N
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.transpose(-3, -2).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))


def _partition(x: Tensor, w: int) -> Tensor:
    """``(B, H, W, C)`` with H, W multiples of ``w`` -> ``(B, nW, w*w, C)`` windows in row-major order."""
    b, hh, ww, c = x.shape
    x = x.view(b, hh // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hh // w) * (ww // w), w * w, c)


def _unpartition(x: Tensor, w: int, hh: int, ww: int) -> Tensor:
    """Inverse of :func:`_partition`: ``(B, nW, w*w, C)`` -> ``(B, H, W, C)``."""
    b, _, _, c = x.shape
    x = x.view(b, hh // w, ww // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hh, ww, c)


def shifted_window_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> Tensor:
    """``(nW, N, N)`` additive mask for shifted windows of a ``(hp, wp)`` map (multiples of ``window``).

    After the cyclic shift by ``-shift``, a window can contain tokens from up to 4 regions that were not
    neighbours in the image; pairs from different regions get -100 (exp(-100) ~ 0 after softmax).
    """

    # Region label per axis: 0 = main part, 1 = last window minus shift, 2 = the wrapped-around strip.
    def labels(size: int) -> Tensor:
        lab = torch.zeros(size, dtype=torch.int64, device=device)
        lab[size - window : size - shift] = 1
        lab[size - shift :] = 2
        return lab

    region = labels(hp)[:, None] * 3 + labels(wp)[None, :]  # (hp, wp)
    win = _partition(region[None, :, :, None].float(), window)[0, :, :, 0]  # (nW, N)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class SwinTransformerBlock(nn.Module):
    """Pre-norm block: ``x + W-MSA(norm1(x))`` then ``x + MLP(norm2(x))``; windows shifted if ``shift > 0``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError("shift_size must be in [0, window_size)")
        self.window_size = window_size
        self.shift_size = shift_size
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """
        Args:
            x: ``(B, H, W, C)``.
            attn_mask: the stage's shifted-window mask ``(nW, N, N)`` (used only when shifted).

        Returns:
            ``(B, H, W, C)``.
        """
        _, h, w, _ = x.shape
        ws, s = self.window_size, self.shift_size
        y = self.norm1(x)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if s > 0:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(_partition(y, ws), attn_mask if s > 0 else None)
        y = _unpartition(y, ws, hp, wp)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = y[:, :h, :w]
        x = x + _drop_path(y, self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def merge_patches(x: Tensor) -> Tensor:
    """``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 4C)``: zero-pad to even, concat 2x2 neighbours
    in the order (row, col) = (0,0), (1,0), (0,1), (1,1) (the official layout of ``reduction``)."""
    _, h, w, _ = x.shape
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)


class PatchMerging(nn.Module):
    """Halve the resolution, double the channels: ``reduction(norm(merge_patches(x)))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(merge_patches(x)))


class SwinStage(nn.Module):
    """``depth`` blocks alternating regular / shifted windows, then optional :class:`PatchMerging`."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                0 if j % 2 == 0 else window_size // 2,
                mlp_ratio,
                qkv_bias,
                drop,
                attn_drop,
                drop_path[j],
            )
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, H, W, C)`` -> (stage output ``(B, H, W, C)``, input of the next stage)."""
        _, h, w, _ = x.shape
        ws = self.window_size
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device) if self.shift_size > 0 else None
        for blk in self.blocks:
            if self.use_checkpoint and self.training:
                x = torch_checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        nxt = self.downsample(x) if self.downsample is not None else x
        return x, nxt


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``embed_dim`` channels (+ LayerNorm)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, ceil(H/p), ceil(W/p), C)`` channels-last (input zero-padded)."""
        p = self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class SwinTransformer(nn.Module):
    """Swin Transformer returning ``res2..res5`` (strides 4, 8, 16, 32; channels C, 2C, 4C, 8C).

    Args:
        embed_dim: ``C``; 96 (T/S), 128 (B), 192 (L).
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: 7 for 224 pretraining, 12 for 384 (Swin-L of Mask DINO).
        pretrain_img_size: recorded for the (unused here) absolute position embedding of ``ape``.
        drop_path_rate: stochastic depth, linearly increasing over all blocks (official 0.3).
        out_features: which of ``res2..res5`` to return; each gets its own LayerNorm ``norm{i}``.
        ape: absolute position embedding (False in every Mask DINO config).
        use_checkpoint: activation checkpointing of each block in training.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        ape: bool = False,
        patch_norm: bool = True,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        unknown = [f for f in out_features if f not in {f"res{i + 2}" for i in range(len(depths))}]
        if unknown:
            raise ValueError(f"unknown out_features {unknown}")
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.window_size = window_size
        self.pretrain_img_size = pretrain_img_size
        self.patch_size = patch_size
        self.out_features = tuple(out_features)
        self.num_features = [embed_dim * 2**i for i in range(self.num_layers)]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.absolute_pos_embed: nn.Parameter | None = None
        if ape:
            n = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, n, n))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.layers = nn.ModuleList()
        start = 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            self.layers.append(
                SwinStage(
                    self.num_features[i],
                    depth,
                    heads,
                    window_size,
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    dpr[start : start + depth],
                    i < self.num_layers - 1,
                    use_checkpoint,
                )
            )
            start += depth
        for name in self.out_features:
            i = int(name[3:]) - 2
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self._init_weights()

    def _init_weights(self) -> None:
        # The official init (used when not loading ImageNet weights): trunc-normal Linear, unit LayerNorm.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> dict[str, int]:
        """Channels of each returned feature."""
        return {f: self.num_features[int(f[3:]) - 2] for f in self.out_features}

    @property
    def out_strides(self) -> dict[str, int]:
        """Stride of each returned feature relative to the input."""
        return {f: self.patch_size * 2 ** (int(f[3:]) - 2) for f in self.out_features}

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the returned features."""
        return {f: ShapeSpec(self.out_channels[f], self.out_strides[f]) for f in self.out_features}

    @property
    def supports_padding_mask(self) -> bool:
        # Windows would mix padded and valid tokens (as they do in the official model): the padding-aware model
        # instead runs each image at its own size (maskdino.modeling.model.backbone_at_own_sizes).
        return False

    def freeze(self, freeze_at: int) -> None:
        """detectron2 FREEZE_AT semantics: 1 = the patch embedding, k = it and the stages of res2..res{k}."""
        if freeze_at >= 1:
            self.patch_embed.requires_grad_(False)
        for stage in self.layers[: max(0, freeze_at - 1)]:
            stage.requires_grad_(False)

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, batch: PaddedBatch | Tensor) -> dict[str, Tensor]:
        """
        Args:
            batch: ``(B, 3, H, W)`` normalised images (any H, W; padded internally), as a
                :class:`~detr_core.padding.PaddedBatch` or a plain tensor. Its padding is treated as image content,
                as in the official model (``supports_padding_mask`` is False: a padding-exact model runs each image
                at its own size instead).

        Returns:
            ``{"res2": (B, C, ceil(H/4), ceil(W/4)), ..., "res5": (B, 8C, ~H/32, ~W/32)}`` for the
            requested ``out_features``.
        """
        x = batch.tensor if isinstance(batch, PaddedBatch) else batch
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer expects (B, C, H, W), got {tuple(x.shape)}")
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)
        outs: dict[str, Tensor] = {}
        for i, stage in enumerate(self.layers):
            y, x = stage(x)
            name = f"res{i + 2}"
            if name in self.out_features:
                outs[name] = getattr(self, f"norm{i}")(y).permute(0, 3, 1, 2).contiguous()
        return outs


def build_swin(
    variant: str = "large", window_size: int | None = None, pretrain_img_size: int | None = None, **kwargs
) -> SwinTransformer:
    """Swin ``tiny``/``small``/``base``/``large``; ``large`` defaults to the 384/window-12 model of Mask DINO.

    Extra keyword arguments go to :class:`SwinTransformer`.
    """
    if variant not in SWIN_VARIANTS:
        raise ValueError(f"unknown Swin variant {variant!r}; choose from {sorted(SWIN_VARIANTS)}")
    embed_dim, depths, heads = SWIN_VARIANTS[variant]
    big = variant == "large"
    return SwinTransformer(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window_size if window_size is not None else (12 if big else 7),
        pretrain_img_size=pretrain_img_size if pretrain_img_size is not None else (384 if big else 224),
        **kwargs,
    )


_NAME_TO_VARIANT = {"swin_t": "tiny", "swin_s": "small", "swin_b": "base", "swin_l": "large"}

# Keys of the released ImageNet Swin checkpoints that have no counterpart here: the classifier head, its
# final LayerNorm and the precomputed shifted-window masks (recomputed per input size here).
_IGNORED_PRETRAIN_KEYS = ("head.", "norm.")


def load_swin_pretrained(model: SwinTransformer, path: str) -> None:
    """Load an ImageNet Swin checkpoint (``.pth`` of the Swin repo or detectron2-converted ``.pkl``).

    Raises:
        RuntimeError: naming missing / unexpected keys (the head, the final ``norm`` and ``attn_mask``
            buffers are ignored; the output norms ``norm0..3`` are new and may be missing).
    """
    from detr_core.checkpoint import load_state_dict_file

    sd = load_state_dict_file(path)
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    sd = {
        k: v
        for k, v in sd.items()
        if not k.startswith(_IGNORED_PRETRAIN_KEYS) and not k.endswith(".attn_mask")
    }
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k.startswith("norm") and k[4:5].isdigit())]
    if missing or unexpected:
        raise RuntimeError(f"Swin weights {path}: missing {missing}, unexpected {unexpected}")


def build_swin_backbone(cfg: BackboneConfig) -> SwinTransformer:
    """Swin backbone from a :class:`maskdino.config.BackboneConfig` (``name`` = ``swin_t|swin_s|swin_b|swin_l``).

    ``swin_l`` is the 384-pretrained window-12 model of the released Mask DINO Swin-L checkpoints; the
    others use window 7 (224 pretraining). ``cfg.weights`` (optional) is a local ImageNet checkpoint.
    """
    name = cfg.name.lower()
    if name not in _NAME_TO_VARIANT:
        raise ValueError(f"unknown Swin backbone {cfg.name!r}; expected one of {sorted(_NAME_TO_VARIANT)}")
    model = build_swin(
        _NAME_TO_VARIANT[name], drop_path_rate=cfg.drop_path_rate, out_features=tuple(cfg.out_features)
    )
    if cfg.weights:
        load_swin_pretrained(model, cfg.weights)
    model.freeze(cfg.freeze_at)
    return model
