"""Checkpoint I/O and the official key map, against the official key lists in shared/spec/official-keys."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from detr_core.checkpoint import (
    KeyMapError,
    load_into_model,
    load_state_dict_file,
    match_aliases,
)
from maskdino.checkpoints import ALIASES, convert_official_state_dict, load_official_checkpoint
from maskdino.cli.convert import convert_main
from maskdino.config import get_preset
from maskdino.modeling.model import build_model

SPEC = Path(__file__).resolve().parents[3] / ".." / "shared" / "spec" / "official-keys"
OFFICIAL = {
    "coco-instance-r50-3s-d1-2048": "instance-segmentation__maskdino_R50_bs16_50ep_3s_dowsample1_2048.txt",
    "coco-panoptic-r50": "panoptic-segmentation__maskdino_R50_bs16_50ep_3s_dowsample1_2048.txt",
    "ade20k-semantic-r50": "semantic-segmentation__maskdino_R50_bs16_160k_steplr.txt",
}
# Parameter counts of the official models (shared/spec/README.md, official-maskdino.md).
OFFICIAL_PARAMS = {
    "coco-instance-r50-3s-d1-2048": 52_058_004,
    "coco-panoptic-r50": 52_085_193,
    "ade20k-semantic-r50": 43_812_299,
}


def official_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    path = SPEC / OFFICIAL[preset]
    if not path.exists():
        pytest.skip(f"official key list not found at {path}")
    shapes = {}
    for line in path.read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


def alias_source(key: str) -> str | None:
    """The official key whose value an alias key repeats (tied modules), else None."""
    m = re.match(r"^sem_seg_head\.predictor\.(?:decoder\.)?bbox_embed\.\d+\.(.+)$", key)
    if m:
        return "sem_seg_head.predictor._bbox_embed." + m.group(1)
    if key.startswith("sem_seg_head.predictor.decoder.norm."):
        return key.replace("decoder.norm.", "decoder_norm.")
    return None


def synthetic_official(preset: str, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values in the official layout; tied aliases repeat their source, as in a real checkpoint."""
    shapes = official_shapes(preset)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if alias_source(key) is None:
            sd[key] = (
                torch.randn(shape, generator=g) if device == "cpu" else torch.empty(shape, device="meta")
            )
    for key in shapes:
        src = alias_source(key)
        if src is not None:
            sd[key] = sd[src].clone() if device == "cpu" else sd[src]
    assert list(sd) != [] and set(sd) == set(shapes)
    return sd


# ------------------------------------------------------------------------------------------- key map


@pytest.mark.parametrize("preset", list(OFFICIAL))
def test_official_keys_map_exactly_onto_our_model(preset):
    official = synthetic_official(preset, device="meta")
    with torch.device("meta"):
        model = build_model(get_preset(preset))
    own = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[preset]
    converted = match_aliases(convert_official_state_dict(official), own.keys(), ALIASES)
    assert sorted(converted) == sorted(own), "no key left over either way"
    for k, v in converted.items():
        assert v.shape == own[k].shape, k
    # 720 (714) official keys = ours + empty_weight + 9 + 9 per-layer box-head aliases (6 tensors each)
    # - the decoder's own alias of the shared box head (6 tensors).
    assert len(official) - 1 - 2 * 9 * 6 + 6 == len(converted)


def test_official_checkpoint_values_land_in_the_right_modules(tmp_path):
    preset = "coco-instance-r50-3s-d1-2048"
    official = synthetic_official(preset)
    path = tmp_path / "maskdino_r50_official.pth"
    torch.save({"model": official, "iteration": 368749, "__author__": "detectron2"}, path)
    model = build_model(get_preset(preset))
    load_official_checkpoint(path, model, strict=True)
    bb, pd, pr = model.backbone, model.pixel_decoder, model.predictor
    sh = "sem_seg_head."
    pairs = {
        "backbone.stem.conv1.weight": bb.conv1.weight,
        "backbone.stem.conv1.norm.running_var": bb.bn1.running_var,
        "backbone.res2.0.shortcut.weight": bb.layer1[0].downsample[0].weight,
        "backbone.res2.0.shortcut.norm.bias": bb.layer1[0].downsample[1].bias,
        "backbone.res4.5.conv3.norm.running_mean": bb.layer3[5].bn3.running_mean,
        "backbone.res5.2.conv2.weight": bb.layer4[2].conv2.weight,
        sh + "pixel_decoder.input_proj.3.1.weight": pd.input_proj[3][1].weight,
        sh + "pixel_decoder.transformer.level_embed": pd.transformer.level_embed,
        sh + "pixel_decoder.adapter_1.norm.bias": pd.adapter_1.norm.bias,
        sh + "pixel_decoder.layer_1.weight": pd.layer_1.weight,
        sh + "predictor._bbox_embed.layers.2.bias": pr.bbox_embed.layers[2].bias,
        sh + "predictor.decoder_norm.weight": pr.decoder.norm.weight,
        sh + "predictor.decoder.layers.8.self_attn.in_proj_weight": pr.decoder.layers[
            8
        ].self_attn.in_proj_weight,
        sh + "predictor.decoder.layers.0.cross_attn.sampling_offsets.bias": (
            pr.decoder.layers[0].cross_attn.sampling_offsets.bias
        ),
        sh + "predictor.class_embed.weight": pr.class_embed.weight,
        sh + "predictor.label_enc.weight": pr.label_enc.weight,
    }
    for key, ours in pairs.items():
        assert torch.equal(ours.detach(), official[key]), key
    # the shared box head really is shared: the decoder uses the loaded values
    assert pr.decoder.bbox_embed is pr.bbox_embed


def test_untied_aliases_are_rejected():
    sd = {
        "sem_seg_head.predictor._bbox_embed.layers.0.weight": torch.zeros(2, 2),
        "sem_seg_head.predictor.bbox_embed.0.layers.0.weight": torch.zeros(2, 2),
        "sem_seg_head.predictor.decoder.bbox_embed.0.layers.0.weight": torch.ones(2, 2),
    }
    with pytest.raises(KeyMapError, match="decoder.bbox_embed.0"):
        convert_official_state_dict(sd, backbone="swin")
    sd = {
        "sem_seg_head.predictor.decoder_norm.weight": torch.zeros(3),
        "sem_seg_head.predictor.decoder.norm.weight": torch.ones(3),
    }
    with pytest.raises(KeyMapError, match="decoder.norm"):
        convert_official_state_dict(sd, backbone="swin")


def test_resnet_key_rules_by_hand():
    keys = {
        "backbone.stem.conv1.weight": "backbone.conv1.weight",
        "backbone.stem.conv1.norm.weight": "backbone.bn1.weight",
        "backbone.res2.0.shortcut.weight": "backbone.layer1.0.downsample.0.weight",
        "backbone.res3.0.shortcut.norm.running_mean": "backbone.layer2.0.downsample.1.running_mean",
        "backbone.res5.2.conv3.norm.running_var": "backbone.layer4.2.bn3.running_var",
        "backbone.res4.12.conv1.weight": "backbone.layer3.12.conv1.weight",
        "sem_seg_head.pixel_decoder.mask_features.bias": "pixel_decoder.mask_features.bias",
        "sem_seg_head.predictor.query_feat.weight": "predictor.query_feat.weight",
    }
    out = convert_official_state_dict({k: torch.zeros(1) for k in [*keys, "criterion.empty_weight"]})
    assert sorted(out) == sorted(keys.values())


# ------------------------------------------------------------------------------------------------ CLI


def to_official_layout(
    sd: dict[str, torch.Tensor], num_classes: int, num_layers: int
) -> dict[str, torch.Tensor]:
    """Inverse of the documented map, written independently: our names -> detectron2 names + aliases."""
    out = {}
    for k, v in sd.items():
        if k.startswith("predictor.decoder.bbox_embed."):
            continue  # re-created below from the shared head
        if k.startswith("backbone."):
            k = k.replace("backbone.conv1.", "backbone.stem.conv1.").replace(
                "backbone.bn1.", "backbone.stem.conv1.norm."
            )
            m = re.match(r"backbone\.layer(\d)\.(\d+)\.(.+)", k)
            if m:
                stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
                rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
                rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
                k = f"backbone.res{stage}.{block}.{rest}"
            out[k] = v
        else:
            k = k.replace("predictor.bbox_embed.", "predictor._bbox_embed.")
            out["sem_seg_head." + k] = v
    for k in [k for k in out if k.startswith("sem_seg_head.predictor._bbox_embed.")]:
        rest = k.removeprefix("sem_seg_head.predictor._bbox_embed.")
        for i in range(num_layers):
            out[f"sem_seg_head.predictor.bbox_embed.{i}.{rest}"] = out[k].clone()
            out[f"sem_seg_head.predictor.decoder.bbox_embed.{i}.{rest}"] = out[k].clone()
    out["criterion.empty_weight"] = torch.ones(num_classes + 1)
    return out


def test_convert_cli_tiny_preset_round_trip(tmp_path, capsys):
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    official = to_official_layout(ours, cfg.num_classes, cfg.decoder.dec_layers)
    assert any(k.startswith("backbone.res2.0.conv1.norm.") for k in official)
    src = tmp_path / "official.pth"
    torch.save({"model": official}, src)
    dst = tmp_path / "converted.safetensors"
    assert convert_main([str(src), str(dst), "--preset", "tiny"]) == 0
    assert "strict load" in capsys.readouterr().out
    back = load_state_dict_file(dst)
    fresh = build_model(cfg)
    load_into_model(fresh, match_aliases(back, fresh.state_dict().keys(), ALIASES), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ours[k]), k
    assert convert_main([str(src), str(tmp_path / "converted.pt")]) == 0
    assert sorted(load_state_dict_file(tmp_path / "converted.pt")) == sorted(back)


def test_converted_checkpoint_runs_in_official_mode_with_no_flag(tmp_path, capsys):
    from maskdino.checkpoints import official_experiment
    from maskdino.data.coco_categories import coco_metadata
    from maskdino.inference.predictor import load_model

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    official = to_official_layout(dict(model.state_dict()), cfg.num_classes, cfg.decoder.dec_layers)
    src = tmp_path / "official.pth"
    torch.save({"model": official}, src)
    dst = tmp_path / "converted.pth"
    assert convert_main([str(src), str(dst), "--preset", "tiny"]) == 0
    assert "padding_mode='official'" in capsys.readouterr().out
    loaded = load_model(dst)  # what `maskdino predict/eval --weights dst` does: no --config, no --opts
    assert loaded.model.padding_mode == "official" and loaded.config.data.test_resize == "pil"
    assert loaded.model.predictor.decoder.query_pos_from_scaled_reference  # the official query positions
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # our own training runs keep padding awareness; overriding the converted file's mode is possible
    assert get_preset("tiny").padding_mode == "aware"
    assert load_model(dst, opts=["model.padding_mode=aware"]).model.padding_mode == "aware"
    # the official recipes: padding is content, the detectron2 resize, and COCO class names for COCO presets
    exp = official_experiment("coco-panoptic-r50")
    assert exp.model.padding_mode == "official" and exp.data.test_resize == "pil"
    assert (exp.data.test_short_edge, exp.data.test_max_size) == (800, 1333)
    meta = coco_metadata(panoptic=True)
    assert meta.num_classes == 133 == exp.model.num_classes and meta.names[0] == "person"
    assert meta.thing_classes == exp.model.inference.thing_classes
    assert coco_metadata().num_classes == 80 and coco_metadata().dataset_ids[-1] == 90


def test_pil_resize_is_detectron2s():
    from PIL import Image

    from maskdino.data.transforms import ResizeShortestEdge, pil_bilinear_resize

    # detectron2's rounding: int(x + 0.5) of the scaled sides, the longer side capped first
    assert ResizeShortestEdge.output_size(427, 640, 800, 1333) == (800, 1199)
    assert ResizeShortestEdge.output_size(480, 640, 800, 1333) == (800, 1067)
    assert ResizeShortestEdge.output_size(200, 1000, 800, 1333) == (267, 1333)
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 37, 53, generator=g) * 255).to(torch.uint8)
    ours = pil_bilinear_resize(image, 60, 86)
    ref = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((86, 60), Image.Resampling.BILINEAR)
    assert torch.equal(ours, torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1))
    from torchvision import tv_tensors

    out = ResizeShortestEdge(60, 1000, backend="pil")({"image": tv_tensors.Image(image)})["image"]
    assert out.shape == (3, 60, 86) and torch.equal(out.as_subclass(torch.Tensor), ours)
