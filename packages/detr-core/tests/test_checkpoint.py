"""Checkpoint files: safe reading (weights only, restricted pickles), atomic writing, key maps, strict loading."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from detr_core import checkpoint as ckpt
from detr_core.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    KeyMap,
    KeyMapError,
    check_finite,
    load_into_model,
    load_state_dict_file,
    match_aliases,
    remove_orphaned_temporaries,
    save_checkpoint,
)


def test_round_trip_safetensors_and_pt_with_shared_tensors(tmp_path):
    shared = torch.randn(3, 4)
    sd = {"a.weight": shared, "b.weight": shared, "c": torch.arange(5), "d": torch.randn(2).half()}
    for name in ("x.safetensors", "x.pt"):
        save_checkpoint(sd, tmp_path / name)
        back = load_state_dict_file(tmp_path / name)
        assert sorted(back) == sorted(sd)
        for k in sd:
            assert torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype, (name, k)
    # detectron2-style wrapper
    save_checkpoint({"model": sd, "iteration": 3}, tmp_path / "d2.pth")
    assert sorted(load_state_dict_file(tmp_path / "d2.pth")) == sorted(sd)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_pkl_loader_reads_numpy_and_refuses_arbitrary_objects(tmp_path):
    arrays = {
        "conv1.weight": np.random.default_rng(0).random((2, 3), dtype=np.float32),
        "fc.bias": np.arange(3, dtype=np.int64),
    }
    good = tmp_path / "good.pkl"
    with open(good, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "torchvision", "matching_heuristics": True}, f)
    sd = load_state_dict_file(good)
    assert sorted(sd) == ["conv1.weight", "fc.bias"]
    assert torch.equal(sd["conv1.weight"], torch.from_numpy(arrays["conv1.weight"]))
    assert sd["fc.bias"].dtype == torch.int64

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "payload": Evil()}, f)
    with pytest.raises(CheckpointError, match="system"):
        load_state_dict_file(bad)
    assert not (tmp_path / "pwned").exists()
    # a numpy object array could smuggle objects through __setstate__: still only allowed globals
    with open(bad, "wb") as f:
        pickle.dump({"model": {"w": np.array([Evil()], dtype=object)}}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        load_state_dict_file(bad)


def test_pth_with_numpy_arrays_loads_weights_only(tmp_path):
    # some detectron2 .pth files hold numpy arrays: allowed (and nothing else)
    path = tmp_path / "np.pth"
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    torch.save({"model": {"w": w, "b": torch.ones(2), "s": np.int64(3)}, "iteration": np.int64(5)}, path)
    sd = load_state_dict_file(path)
    assert torch.equal(sd["w"], torch.from_numpy(w)) and torch.equal(sd["b"], torch.ones(2))
    assert sd["s"].shape == () and int(sd["s"]) == 3


def test_pth_loader_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="would run code") as err:
        load_state_dict_file(path)
    # the message names the file and never suggests unsafe loading
    assert str(path) in str(err.value) and "weights_only" not in str(err.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch, suffix):
    target = tmp_path / f"model{suffix}"
    save_checkpoint({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    monkeypatch.setattr(ckpt.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        save_checkpoint({"w": torch.zeros(1000)}, target)
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp file left
    monkeypatch.undo()
    with pytest.raises(OSError):  # a new file that fails is never created at all
        monkeypatch.setattr(ckpt.os, "fsync", failing_fsync)
        save_checkpoint({"w": torch.zeros(1)}, tmp_path / f"new{suffix}")
    assert not (tmp_path / f"new{suffix}").exists()


def test_unreadable_files_name_the_file_and_the_reason(tmp_path):
    rand = tmp_path / "random.pth"
    rand.write_bytes(os.urandom(2000))
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(300)}}, good)
    trunc = tmp_path / "truncated.pth"
    trunc.write_bytes(good.read_bytes()[:700])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path, words in (
        (rand, "not a PyTorch"),
        (trunc, "truncated or corrupt"),
        (empty, "not a valid checkpoint"),
    ):
        with pytest.raises(CheckpointError, match=words) as err:
            load_state_dict_file(path)
        assert str(path) in str(err.value) and "weights_only" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict_file(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="folder"):
        load_state_dict_file(tmp_path)
    not_weights = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(CheckpointError, match="expected a dict of weights"):
        load_state_dict_file(not_weights)


def test_argparse_namespace_in_a_checkpoint_is_allowed(tmp_path):
    # DINO / Deformable DETR checkpoints store their command line as an argparse.Namespace
    import argparse

    path = tmp_path / "dino.pth"
    torch.save(
        {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4, backbone="resnet50")}, path
    )
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))


def test_check_finite_names_the_first_bad_tensor():
    check_finite({"a": torch.ones(3), "i": torch.arange(3)})
    with pytest.raises(CheckpointError, match=r"'b\.weight'.*2 non-finite"):
        check_finite(
            {"a": torch.ones(3), "b.weight": torch.tensor([1.0, float("nan"), float("inf")])}, "x.pth"
        )


def test_key_map_rules_drop_rename_and_check_tied_copies():
    km = KeyMap(
        [
            (r"^loss\.", None),
            (r"^head\.", ""),
            (r"^layers\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) + 1}."),
            (r"^box\.\d+\.", "box."),
        ]
    )
    t = torch.ones(2)
    out = km.convert({"loss.w": t, "head.layers.0.w": t, "box.0.b": t, "box.1.b": t.clone(), "other": t})
    assert sorted(out) == ["blocks.1.w", "box.b", "other"]
    assert km.map_key("loss.anything") is None
    with pytest.raises(KeyMapError, match=r"box\.1\.b and box\.0\.b both map to box\.b"):
        km.convert({"box.0.b": t, "box.1.b": torch.zeros(2)})


def test_match_aliases_spreads_canonical_keys():
    sd = {"bbox.w": torch.ones(1), "x": torch.zeros(1), "dec.bbox.v": torch.ones(1)}
    out = match_aliases(sd, ["bbox.w", "dec.bbox.w", "x", "bbox.v"], {"dec.bbox.": "bbox."})
    assert sorted(out) == ["bbox.v", "bbox.w", "dec.bbox.w", "x"]
    assert out["dec.bbox.w"] is sd["bbox.w"] and out["bbox.v"] is sd["dec.bbox.v"]


def test_orphaned_temporaries_are_removed_and_nothing_else(tmp_path):
    for name in (".model_0000010.pth.ab12cd.tmp", ".model_final.pth.x_y.tmp", ".other.pth.abc.tmp",
                 "model_0000010.pth", "notes.tmp", ".model_0000010.pth"):  # fmt: skip
        (tmp_path / name).write_text("x")
    import re

    removed = remove_orphaned_temporaries(tmp_path, re.compile(r"model_(\d{7}|final)\.pth"))
    assert sorted(p.name for p in removed) == [".model_0000010.pth.ab12cd.tmp", ".model_final.pth.x_y.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model_0000010.pth", ".other.pth.abc.tmp",
                                                          "model_0000010.pth", "notes.tmp"]  # fmt: skip


def test_strict_load_names_every_missing_and_unexpected_key():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    sd = dict(model.state_dict())
    del sd["1.bias"]
    sd["2.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(4, 4)
    with pytest.raises(CheckpointMismatchError) as err:
        load_into_model(model, sd, strict=True)
    msg = str(err.value)
    assert "1.bias" in msg and "2.weight" in msg and "0.weight: (4, 4) vs (3, 2)" in msg
    report = load_into_model(model, sd, strict=False)
    assert report.missing == ["1.bias"] and report.unexpected == ["2.weight"] and not report.ok
