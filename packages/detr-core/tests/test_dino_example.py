"""The DINO example (``examples/dino``): the official checkpoint layout (recorded key names and shapes, no official
code), strict loading, the key map round trip, a named error for a foreign file, and a few training steps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from detr_core.checkpoint import CheckpointMismatchError, ForeignLayoutError, KeyMapError, match_aliases

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import dino  # noqa: E402
from dino.checkpoint import read_layout  # noqa: E402


@pytest.fixture(scope="module")
def tiny() -> dino.DINO:
    torch.manual_seed(0)
    return dino.DINO(dino.TINY)


def _compare_tool():
    if not (ROOT / "tools" / "compare_dino" / "ours.py").is_file():
        pytest.skip("tools/compare_dino is not in this checkout")
    sys.path.insert(0, str(ROOT))
    from tools.compare_dino import ours

    return ours


def _official_file(path: Path, layout: dict, model: dino.DINO, tied_break: bool = False) -> Path:
    """A file written like DINO's main.py: our weights in the official layout, ``args`` a Namespace."""
    sd = {k: v.clone() for k, v in dino.to_official(model.state_dict(), layout).items()}
    if tied_break:
        sd["transformer.decoder.bbox_embed.1.layers.0.bias"] += 1.0
    torch.save({"model": sd, "epoch": 11, "args": argparse.Namespace(num_queries=30)}, path)
    return path


@pytest.mark.parametrize("name", ["dino-tiny", "dino-4scale-r50"])
def test_recorded_official_layouts_map_onto_the_example(name):
    """The parity tool's key checks on the recorded official layouts: every key mapped, shapes equal, round trip."""
    ours = _compare_tool()
    layout = read_layout(dino.LAYOUTS[name])
    cfg = dino.TINY if name == "dino-tiny" else dino.DINOConfig()
    with torch.device("meta"):  # names and shapes only: no memory, no init cost
        model = dino.DINO(cfg)
    report = ours.Report()
    ours.key_rows(report, layout, model, name)
    assert [r.status for r in report.rows] == ["ok", "ok"], report.rows
    assert len(layout) == {"dino-tiny": 410, "dino-4scale-r50": 626}[name]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == {"dino-tiny": 32_139_472, "dino-4scale-r50": 46_893_182}[name]


def test_key_map_round_trip_and_strict_load_of_the_official_layout(tiny, tmp_path):
    layout = read_layout(dino.LAYOUTS["dino-tiny"])
    own = tiny.state_dict()
    official = dino.to_official(own, layout)
    assert list(official) == list(layout)  # every official name, in the official order
    assert all(tuple(official[k].shape) == layout[k] for k in layout)
    back = match_aliases(dino.OFFICIAL_KEY_MAP.convert(official), own.keys(), dino.ALIASES)
    assert sorted(back) == sorted(own) and all(back[k].data_ptr() == own[k].data_ptr() for k in own)
    # a file in the recorded layout with values drawn here (each shared head's copies tied, as the official
    # state dict repeats them), saved from a DistributedDataParallel model ("module." prefix)
    g = torch.Generator().manual_seed(0)
    drawn = {k: torch.randn(v.shape, generator=g) for k, v in own.items()}
    for k in [k for k in drawn if k.startswith("decoder.bbox_embed.")]:  # one module under two names
        drawn[k] = drawn[k.removeprefix("decoder.")]
    sd = dino.to_official(drawn, layout)
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "dino.pth")
    model = dino.DINO(dino.TINY)
    dino.load_official_checkpoint(tmp_path / "dino.pth", model)
    state = model.state_dict()
    assert all(torch.equal(state[k], drawn[k]) for k in own)
    # the values sit under the official names the key map documents
    assert torch.equal(
        state["backbone.layer4.2.bn3.running_var"], sd["backbone.0.body.layer4.2.bn3.running_var"]
    )
    assert torch.equal(
        state["query_selection.enc_output_norm.weight"], sd["transformer.enc_output_norm.weight"]
    )
    assert torch.equal(
        state["decoder.bbox_embed.layers.2.bias"], sd["transformer.decoder.bbox_embed.1.layers.2.bias"]
    )


def test_official_file_errors_are_named(tiny, tmp_path):
    layout = read_layout(dino.LAYOUTS["dino-tiny"])
    model = dino.DINO(dino.TINY)
    dino.load_official_checkpoint(_official_file(tmp_path / "ok.pth", layout, tiny), model)
    assert torch.equal(model.state_dict()["label_enc.weight"], tiny.state_dict()["label_enc.weight"])
    with pytest.raises(KeyMapError, match="not tied"):
        dino.load_official_checkpoint(
            _official_file(tmp_path / "untied.pth", layout, tiny, tied_break=True), model
        )
    # another model's file (a Mask DINO / detectron2 layout) and a Deformable DETR one (no tgt_embed, no label_enc)
    torch.save(
        {"model": {"sem_seg_head.predictor.query_feat.weight": torch.zeros(2)}}, tmp_path / "maskdino.pth"
    )
    with pytest.raises(
        ForeignLayoutError, match=r"maskdino\.pth is not a DINO \(IDEA-Research/DINO\) checkpoint"
    ):
        dino.load_official_checkpoint(tmp_path / "maskdino.pth", model)
    deformable = {
        k: v
        for k, v in dino.to_official(tiny.state_dict(), layout).items()
        if "tgt_embed" not in k and "label_enc" not in k
    }
    torch.save({"model": deformable}, tmp_path / "deformable.pth")
    with pytest.raises(ForeignLayoutError, match=r"tgt_embed.*label_enc"):
        dino.load_official_checkpoint(tmp_path / "deformable.pth", model)
    # the full DINO-4scale layout into the tiny model: a strict error that lists the shape mismatches
    big = {
        k: torch.zeros(s)
        for k, s in read_layout(dino.LAYOUTS["dino-4scale-r50"]).items()
        if "layers.1" in k or "class_embed" in k
    }
    small = dino.to_official(tiny.state_dict(), layout)
    torch.save({"model": {**small, **{k: v for k, v in big.items() if k in small}}}, tmp_path / "full.pth")
    with pytest.raises(
        CheckpointMismatchError, match=r"shape mismatch: class_embed\.bias: \(91,\) vs \(4,\)"
    ):
        dino.load_official_checkpoint(tmp_path / "full.pth", model)


def test_tiny_configuration_trains_and_its_losses_decrease():
    torch.manual_seed(0)
    model = dino.DINO(dino.TINY).train()
    criterion = dino.build_criterion(dino.TINY)
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 64, generator=g)]
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.3, 0.2], [0.7, 0.6, 0.2, 0.4]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.5]])},
    ]
    opt = torch.optim.AdamW(dino.param_groups(model), lr=1e-4, weight_decay=1e-4)
    totals = []
    for _ in range(5):
        out = model(images, targets)
        losses = criterion(out, targets)
        total = sum(criterion.weighted(losses).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    # 15 weighted keys for 2 decoder layers: final, aux 0, interm, dn, dn_0 x (ce, bbox, giou)
    assert len(criterion.weighted(losses)) == 15 and out.denoising is not None
    assert all(torch.isfinite(torch.tensor(totals)))
    assert totals[-1] < 0.9 * totals[0], totals
    model.eval()
    dets = model.predict(images, [(64, 64), (48, 64)])
    assert dets[0].scores.shape == (30,) and dets[1].boxes.shape == (30, 4)
