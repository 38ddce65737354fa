"""DDP on CPU: 2 gloo processes train the tiny model for a few iterations; the weights stay identical across
ranks and match a single-process run on the same global batch.

For the comparison to be meaningful the forward pass must not depend on which process draws the random
numbers: denoising queries are turned off (``model.decoder.dn=no``) and ``torch.rand`` (the uniform points of
the matcher's mask costs and of the importance-sampled mask losses, and the LSJ scale) is replaced by a
draw that depends only on the trailing shape, so every mask gets the same points whatever the batch split.
What remains to differ is the order of floating-point sums (the DDP all-reduce), hence a small tolerance for
the single-process comparison and exact equality across ranks. The optimizer is plain SGD so that a wrong
gradient scale (loss normalisation over ranks, gradient averaging) would change the weights.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deterministic_rand():
    original = torch.rand

    def rand(*size, generator=None, device=None, dtype=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        g = torch.Generator().manual_seed(1000 + len(shape))
        if len(shape) == 0:
            return original((), generator=g, dtype=dtype or torch.get_default_dtype()).to(device)
        row = original((1, *shape[1:]), generator=g, dtype=dtype or torch.get_default_dtype())
        return row.expand(*shape).clone().to(device)

    return rand


def _worker(rank: int, world: int, port: int, data_root: str, out: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
         "LOCAL_RANK": str(rank)}
    )  # fmt: skip
    torch.set_num_threads(1)
    torch.rand = _deterministic_rand()
    from maskdino.engine.config import apply_overrides, get_experiment
    from maskdino.engine.trainer import Trainer

    cfg = apply_overrides(
        get_experiment("tiny"),
        [
            f"data.root={data_root}", "data.synthetic_train=4", "data.synthetic_val=1", "data.synthetic_seed=2",
            "data.synthetic_size=64", "data.image_size=64", "data.num_workers=0",
            "model.decoder.dn=no", "model.decoder.num_queries=10", "model.loss.train_num_points=64",
            f"train.output_dir={out}", "train.max_iter=3", "train.ims_per_batch=2", "train.log_period=1",
            "train.checkpoint_period=0", "train.eval_period=0", "train.progress_bar=false", "train.tensorboard=false",
            "train.device=cpu", "train.find_unused_parameters=false",
            # plain SGD without clipping: an update proportional to the gradient, so a wrong gradient scale
            # (loss normalisation across ranks, averaging) shows up in the weights (Adam would hide it)
            "solver.optimizer=sgd", "solver.base_lr=0.00002", "solver.clip_value=0", "solver.warmup_iters=0",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.val_ds = None
    torch.save(trainer.model.state_dict(), Path(out) / "weights_init.pt")
    trainer.run()
    torch.save(trainer.model.state_dict(), Path(out) / f"weights_rank{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["total_loss"] for line in path.read_text().splitlines() if "total_loss" in line]


def test_ddp_two_cpu_ranks_match_single_process(tmp_path):
    from maskdino.data.synthetic import generate_synthetic

    data = generate_synthetic(tmp_path / "data", seed=2, num_train=4, num_val=1, size=64)
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path / "ddp")), nprocs=2, join=True)
    mp.spawn(_worker, args=(1, _free_port(), str(data), str(tmp_path / "single")), nprocs=1, join=True)
    w0 = torch.load(tmp_path / "ddp" / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "ddp" / "weights_rank1.pt", weights_only=True)
    ws = torch.load(tmp_path / "single" / "weights_rank0.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks"
        torch.testing.assert_close(w0[k], ws[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the comparison is not trivial: training moved the weights far more than the tolerance
    w_init = torch.load(tmp_path / "ddp" / "weights_init.pt", weights_only=True)
    change = max(float((w0[k].float() - w_init[k].float()).abs().max()) for k in w0 if w0[k].is_floating_point())
    assert change > 1e-4
    # only rank 0 wrote logs and checkpoints; the logged (rank-averaged) losses equal the single-process ones
    ddp_losses, single_losses = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "single" / "metrics.jsonl")
    assert len(ddp_losses) == len(single_losses) == 3
    for a, b in zip(ddp_losses, single_losses):
        assert a == pytest.approx(b, rel=1e-4)
    assert (tmp_path / "ddp" / "model_final.pth").is_file()
