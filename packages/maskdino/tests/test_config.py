"""Config dataclasses, presets and strict (de)serialisation."""

from __future__ import annotations

import json

import pytest
import yaml

from maskdino.config import PRESETS, ConfigError, MaskDINOConfig, get_preset, load_config, save_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trip(name, tmp_path):
    cfg = get_preset(name)
    assert MaskDINOConfig.from_dict(cfg.to_dict()) == cfg
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"cfg{suffix}"
        save_config(cfg, path)
        assert load_config(path) == cfg


def test_presets_follow_official_yaml():
    base = get_preset("coco-instance-r50-3s-d1-2048")
    assert (base.num_classes, base.decoder.num_queries, base.decoder.dec_layers) == (80, 300, 9)
    assert base.pixel_decoder.transformer_in_features == ["res3", "res4", "res5"]
    assert (base.pixel_decoder.total_num_feature_levels, base.pixel_decoder.feature_order) == (4, "low2high")
    assert base.decoder.initialize_box_type == "mask2box" and base.decoder.dn == "seg"
    assert base.loss.train_num_points == 12544
    hid = get_preset("coco-instance-r50-3s-hid1024")
    assert (hid.pixel_decoder.dim_feedforward, hid.pixel_decoder.total_num_feature_levels) == (1024, 3)
    assert (hid.pixel_decoder.feature_order, hid.decoder.initialize_box_type) == ("high2low", "bitmask")
    four = get_preset("coco-instance-r50-4s")
    assert four.pixel_decoder.transformer_in_features == ["res2", "res3", "res4", "res5"]
    pan = get_preset("coco-panoptic-r50")
    assert pan.num_classes == 133 and pan.inference.thing_classes == list(range(80))
    assert pan.inference.panoptic_on and pan.decoder.initialize_box_type == "no"
    ade = get_preset("ade20k-semantic-r50")
    assert ade.num_classes == 150 and not ade.decoder.two_stage and ade.decoder.semantic_ce_loss
    assert ade.decoder.num_queries == 100 and ade.inference.object_mask_threshold == 0.8
    swin = get_preset("coco-instance-swinl")
    assert swin.backbone.name == "swin_l" and swin.pixel_decoder.total_num_feature_levels == 5


def test_unknown_key_names_full_path():
    with pytest.raises(ConfigError, match=r"decoder\.not_a_field"):
        MaskDINOConfig.from_dict({"decoder": {"not_a_field": 1}})
    with pytest.raises(ConfigError, match="'bogus'"):
        MaskDINOConfig.from_dict({"bogus": 1})


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"loss": {"class_weight": 2.0, "typo_weight": 1.0}}))
    with pytest.raises(ConfigError, match=r"loss\.typo_weight"):
        load_config(path)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"inference": {"thing_classes": [1, 2], "instance_on": False}}))
    cfg = load_config(path)
    assert cfg.inference.thing_classes == [1, 2] and not cfg.inference.instance_on
    assert cfg.decoder == MaskDINOConfig().decoder  # missing keys keep their defaults


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"decoder": {"num_queries": "300"}}, r"decoder\.num_queries"),
        ({"decoder": {"two_stage": 1}}, r"decoder\.two_stage"),
        ({"decoder": {"initialize_box_type": "boxes"}}, "initialize_box_type"),
        ({"padding_mode": "sometimes"}, "padding_mode"),
        ({"pixel_mean": [1.0, 2.0]}, "pixel_mean"),
        ({"decoder": {"two_stage": False}}, "two_stage"),  # mask2box init needs two-stage selection
    ],
)
def test_invalid_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        MaskDINOConfig.from_dict(bad)


def test_get_preset_returns_copies():
    a = get_preset("tiny")
    a.decoder.num_queries = 7
    assert get_preset("tiny").decoder.num_queries == 50
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"decoder": 3}, "decoder: expected a mapping, got int"),
        ([1], "<root>: expected a mapping, got list"),
        ({"loss": {"train_num_points": 1.5}}, "loss.train_num_points: expected an integer, got 1.5"),
        (
            {"inference": {"thing_classes": [0, True]}},
            r"inference.thing_classes\[1\]: expected an integer, got True",
        ),
        ({"pixel_std": "1,2,3"}, "pixel_std: expected a list, got '1,2,3'"),
        ({"backbone": {"name": None}}, "backbone.name: None is not allowed"),
    ],
)
def test_type_errors_name_the_dotted_key(bad, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        MaskDINOConfig.from_dict(bad)


def test_ints_accepted_for_float_fields_and_optional_none():
    cfg = MaskDINOConfig.from_dict({"loss": {"class_weight": 3}, "backbone": {"weights": None}})
    assert cfg.loss.class_weight == 3.0 and isinstance(cfg.loss.class_weight, float)
    assert cfg.backbone.weights is None


def test_unsupported_file_type(tmp_path):
    with pytest.raises(ConfigError, match="unsupported config file type '.toml'"):
        save_config(get_preset("tiny"), tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ConfigError, match="unsupported config file type"):
        load_config(tmp_path / "c.toml")


def test_empty_yaml_is_the_default_config(tmp_path):
    path = tmp_path / "empty.yml"
    path.write_text("")
    assert load_config(path) == MaskDINOConfig()
