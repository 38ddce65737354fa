"""DDP on CPU: 2 gloo processes train the tiny model for a few iterations against a single process on the same
global batch.

What holds by construction, on any CPU:

* both ranks hold bit-identical weights after every step (DDP averages the gradients, so every rank applies the same
  update);
* iteration 1 starts from the same weights and data: its loss and its (rank-averaged) gradients equal the single
  process's up to float32 rounding of sums taken in another order (the all-reduce);
* from then on the two runs differ by rounding, which can flip a near-tied Hungarian assignment (on some CPUs it
  does by iteration 2). So later losses are compared only while the per-step matched indices of both runs agree;
  a flip ends the comparison instead of failing it.

For the comparison to be meaningful the forward pass must not depend on which process draws the random numbers:
denoising queries are turned off (``model.decoder.dn=no``) and ``torch.rand`` (the uniform points of the matcher's
mask costs and of the importance-sampled mask losses, and the LSJ scale) is replaced by a draw that depends only on
the trailing shape, so every mask gets the same points whatever the batch split. The optimizer is plain SGD so that
a wrong gradient scale (loss normalisation over ranks, gradient averaging) would change the weights and gradients.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


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
    from maskdino.config import apply_overrides, get_experiment
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
    from detr_core.matcher import HungarianMatcher

    matches: list = []  # per matcher call: [(query indices, target indices) per image]
    original_forward = HungarianMatcher.forward

    def recording_forward(self, pred, targets):
        out = original_forward(self, pred, targets)
        matches.append([(r.tolist(), c.tolist()) for r, c in out])
        return out

    HungarianMatcher.forward = recording_forward
    record: dict = {"matches": [], "checksums": []}

    class RecordingTrainer(Trainer):
        def _step(self, data_iter):
            row = super()._step(data_iter)
            record["matches"].append(list(matches))
            matches.clear()
            # exact per-tensor sums in float64: equal on both ranks iff their weights are bit-identical (in practice)
            record["checksums"].append([float(p.detach().double().sum()) for p in self.model.parameters()])
            return row

    trainer = RecordingTrainer(cfg)
    trainer.val_ds = None
    torch.save(trainer.model.state_dict(), Path(out) / "weights_init.pt")

    def save_first_gradients(optimizer, args, kwargs):
        if "grads" not in record:
            record["grads"] = {
                n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None
            }

    trainer.optimizer.register_step_pre_hook(save_first_gradients)
    trainer.run()
    torch.save(trainer.model.state_dict(), Path(out) / f"weights_rank{rank}.pt")
    torch.save(record, Path(out) / f"record_rank{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["total_loss"] for line in path.read_text().splitlines() if "total_loss" in line]


def test_ddp_two_cpu_ranks_match_single_process(tmp_path):
    from maskdino.data.synthetic import generate_synthetic

    data = generate_synthetic(tmp_path / "data", seed=2, num_train=4, num_val=1, size=64)
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path / "ddp")), nprocs=2, join=True)
    mp.spawn(_worker, args=(1, _free_port(), str(data), str(tmp_path / "single")), nprocs=1, join=True)
    r0, r1, rs = (torch.load(tmp_path / d / f"record_rank{r}.pt", weights_only=True)
                  for d, r in (("ddp", 0), ("ddp", 1), ("single", 0)))  # fmt: skip

    # 1. the ranks agree bit for bit after every step, and at the end
    assert len(r0["checksums"]) == len(r1["checksums"]) == 3
    assert r0["checksums"] == r1["checksums"]
    w0 = torch.load(tmp_path / "ddp" / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "ddp" / "weights_rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks"

    def global_matches(step_of_each_rank):
        # rank r's call i holds the images of rank r: concatenate them in rank order, as the single process sees them
        return [sum((calls[i] for calls in step_of_each_rank), []) for i in range(len(step_of_each_rank[0]))]

    ddp_losses, single_losses = (
        _losses(tmp_path / "ddp" / "metrics.jsonl"),
        _losses(tmp_path / "single" / "metrics.jsonl"),
    )
    assert len(ddp_losses) == len(single_losses) == 3
    same_matches = [
        global_matches([r0["matches"][it], r1["matches"][it]]) == rs["matches"][it] for it in range(3)
    ]
    if not same_matches[0]:
        # batch-of-1 and batch-of-2 forwards differ by rounding; a near-tied assignment can flip even at iteration 1
        pytest.skip(
            "a near-tied Hungarian match flipped at iteration 1 on this CPU; the ranks agree bit for bit"
        )

    # 2. iteration 1: the loss and the averaged gradients equal the single process's up to float32 rounding
    assert ddp_losses[0] == pytest.approx(single_losses[0], rel=1e-5)
    assert set(r0["grads"]) == set(rs["grads"])
    for k, g in rs["grads"].items():
        scale = float(g.abs().max())
        # a sum of N float32 terms in another order differs by ~N * 2^-24 of the magnitude: 1e-4 of the largest
        # entry is far above that and far below any real error (a factor of 2 from a wrong normalisation)
        torch.testing.assert_close(
            r0["grads"][k], g, rtol=0, atol=1e-4 * scale + 1e-12, msg=lambda m, k=k: f"{k}: {m}"
        )

    # 3. later iterations: the same matches give the same losses (rounding only); a flipped match ends the comparison
    for it in range(1, 3):
        if not same_matches[it]:
            break
        assert ddp_losses[it] == pytest.approx(single_losses[it], rel=1e-4), f"iteration {it + 1}"

    # the comparison is not trivial: training moved the weights far more than the rounding
    w_init = torch.load(tmp_path / "ddp" / "weights_init.pt", weights_only=True)
    change = max(
        float((w0[k].float() - w_init[k].float()).abs().max()) for k in w0 if w0[k].is_floating_point()
    )
    assert change > 1e-4
    # only rank 0 wrote logs and checkpoints
    assert (tmp_path / "ddp" / "model_final.pth").is_file()
