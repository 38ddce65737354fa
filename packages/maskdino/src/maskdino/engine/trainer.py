"""The training loop: ``train(cfg)`` from a single CPU process to many GPUs (torchrun + DDP).

Per iteration: ``accumulate`` micro-batches (``ims_per_batch / (world_size * accumulate)`` images per rank
each) -> weighted loss dict from the model -> backward (AMP-scaled on CUDA) -> full-model gradient clip ->
optimizer and LR-schedule step. Rank 0 logs to ``metrics.jsonl`` (and TensorBoard when installed), shows a
tqdm bar with loss and ETA, writes atomic checkpoints and runs the periodic evaluation's bookkeeping.

Exact resume: a checkpoint holds model, optimizer, scheduler, scaler, the iteration, the number of samples
consumed (the position in the sampler's stream) and the python/numpy/torch RNG states. Augmentations are
seeded by stream position and the DataLoader does not draw from the global RNG, so a resumed run computes
the same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from detr_core.matcher import NonFiniteCostError
from maskdino.checkpoints.training import (
    MissingCheckpointError,
    capture_rng_state,
    find_last_checkpoint,
    load_training_checkpoint,
    remove_orphaned_checkpoint_files,
    restore_rng_state,
    save_training_checkpoint,
)
from maskdino.checkpoints.weights import load_model_weights
from maskdino.config import ExperimentConfig
from maskdino.data.build import build_datasets, build_train_loader, save_metadata
from maskdino.engine.distributed import (
    all_reduce_mean,
    barrier,
    broadcast_object,
    init_distributed,
    is_dist,
    reduce_loss_dict,
)
from maskdino.engine.evaluation import evaluate
from maskdino.engine.metrics import format_metrics, json_safe
from maskdino.engine.optim import build_lr_scheduler, build_optimizer, clip_gradients

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "train"]


class NonFiniteLossError(FloatingPointError):
    """A loss (or the gradient norm) became NaN/inf; training stops before any weights are saved."""


@dataclass
class TrainResult:
    iteration: int
    output_dir: Path
    final_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    train_seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))  # noqa: NPY002
    torch.manual_seed(seed)


def _to_device_targets(samples: list[dict[str, Any]], device: torch.device):
    images = [s["image"].as_subclass(torch.Tensor).to(device, non_blocking=True).float() for s in samples]
    targets = [
        {
            "labels": s["instances"]["labels"].to(device),
            "boxes": s["instances"]["boxes"].to(device),
            "masks": s["instances"]["masks"].to(device),
        }
        for s in samples
    ]
    return images, targets


class Trainer:
    """Holds everything of one training run; ``run()`` trains (and evaluates) to ``train.max_iter``.

    Args:
        cfg: the experiment.
        resume: continue from ``output_dir/last_checkpoint`` when present.
        model: use this module instead of ``build_model(cfg.model)`` (tests; custom models). It must take
            ``(images, targets)`` and return a dict of weighted losses in training mode.
        datasets: ``(train_ds, val_ds, metadata, eval_spec)`` instead of building them from ``cfg.data``.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        resume: bool = False,
        model: nn.Module | None = None,
        datasets: tuple | None = None,
    ) -> None:
        self.cfg = cfg
        t = cfg.train
        self.rank, self.world, self.device = init_distributed(t.device)
        self.output_dir = Path(t.output_dir)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for orphan in remove_orphaned_checkpoint_files(self.output_dir):
                self.log(f"removed {orphan.name}, left by an interrupted checkpoint write")
            cfg.save(self.output_dir / "config.yaml")
        per_step = t.ims_per_batch // t.accumulate
        if per_step % self.world:
            raise ValueError(
                f"train.ims_per_batch / train.accumulate = {per_step} is not divisible by the {self.world} processes"
            )
        self.batch_per_rank = per_step // self.world
        seed_everything(t.seed)
        if model is None:
            from maskdino.modeling import build_model

            model = build_model(cfg.model)
        self.model = model.to(self.device)
        if t.init_weights:
            load_model_weights(self.model, t.init_weights)
        self.optimizer = build_optimizer(self.model, cfg.solver)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.solver, t.max_iter)
        cuda = self.device.type == "cuda"
        amp_dtype = torch.float16 if cfg.solver.amp_dtype == "float16" else torch.bfloat16
        # float16 autocast only on CUDA (CPU float16 kernels are slow and partial); bfloat16 on either.
        self.amp_enabled = cfg.solver.amp and (cuda or amp_dtype == torch.bfloat16)
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_enabled and cuda and amp_dtype == torch.float16
        )

        if datasets is None:
            datasets = build_datasets(cfg.data, cfg.model.num_classes)
        self.train_ds, self.val_ds, self.meta, self.eval_spec = datasets
        if self.rank == 0 and self.meta is not None:
            save_metadata(self.meta, self.output_dir)

        self.iteration = 0
        self.consumed = 0  # samples of the global stream consumed (all ranks)
        self._last_saved: Path | None = None
        if resume:
            self._resume()
        if self.rank == 0:
            self._trim_metrics()
        self.ddp_model = self.model
        if is_dist():
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if cuda else None,
                find_unused_parameters=t.find_unused_parameters,
            )
        self._rng_after_resume = None

    # ------------------------------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "consumed_samples": self.consumed,
            "rng": capture_rng_state(),
            "config": self.cfg.to_dict(),
            "metadata": self.meta.to_dict() if self.meta is not None else None,
        }

    def _resume(self) -> None:
        """Continue from ``last_checkpoint`` exactly, or stop: a missing or unreadable checkpoint is an error (every
        rank raises it), never a silent restart from iteration 0. Without any ``last_checkpoint`` the run starts
        fresh and says so."""
        found, error = None, None
        if self.rank == 0:
            try:
                path = find_last_checkpoint(self.output_dir)
                found = str(path) if path is not None else None
            except MissingCheckpointError as e:
                error = str(e)
        found, error = broadcast_object((found, error))
        if error is not None:
            raise MissingCheckpointError(error)
        if found is None:
            self.log(f"resume: no last_checkpoint in {self.output_dir}; starting at iteration 0")
            return
        self._load(Path(found))
        self._last_saved = Path(found)

    def _load(self, path: Path) -> None:
        state = load_training_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.consumed = int(state["consumed_samples"])
        # Restored now, after the model/optimizer were built (their construction drew from the RNG).
        restore_rng_state(state["rng"])
        self.log(f"resumed from {path} at iteration {self.iteration}")

    def save(self, name: str) -> Path | None:
        """Write a checkpoint (rank 0) if the weights are finite; non-finite weights stop training instead, so that
        the latest checkpoint is always the last finite one."""
        bad = next(
            (n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p.detach()).all())), None
        )
        if bad is not None:
            raise NonFiniteLossError(
                f"the weights became non-finite (first: {bad}) by iteration {self.iteration}; not saving {name}. "
                f"{self._last_good()} Try a lower solver.base_lr or gradient clipping (solver.clip_value)."
            )
        path = None
        if self.rank == 0:
            path = save_training_checkpoint(
                self.output_dir, name, self._state(), keep=self.cfg.train.keep_checkpoints
            )
            self._last_saved = path
        barrier()
        return path

    def _last_good(self) -> str:
        if self._last_saved is not None and self._last_saved.is_file():
            return f"The last finite checkpoint is {self._last_saved}."
        return "No checkpoint of this run was written yet."

    # ------------------------------------------------------------------------------------------ logging
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[maskdino] {msg}", flush=True)

    def _trim_metrics(self) -> None:
        """A fresh run starts a new ``metrics.jsonl``; a resumed one drops rows logged after its checkpoint."""
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return
        if self.iteration == 0:
            path.unlink()
            return
        keep = [
            ln
            for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("iteration", 0) <= self.iteration
        ]
        path.write_text("".join(ln + "\n" for ln in keep))

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(row)) + "\n")
        if self._tb is not None:
            it = row.get("iteration", self.iteration)
            for k, v in row.items():
                if isinstance(v, int | float) and k != "iteration":
                    self._tb.add_scalar(k, v, it)

    def _open_tensorboard(self):
        if self.rank != 0 or not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))

    # -------------------------------------------------------------------------------------------- train
    def evaluate(self) -> dict[str, float]:
        if self.val_ds is None:
            return {}
        results = evaluate(
            self.ddp_model, self.val_ds, self.meta, self.eval_spec, self.device,
            output_dir=self.output_dir / "eval", num_workers=0, progress=self.cfg.train.progress_bar,
        )  # fmt: skip
        if self.rank == 0 and results:
            self.log(f"evaluation at iteration {self.iteration}: {format_metrics(results)}")
            self._write_metrics({"iteration": self.iteration, **{f"eval/{k}": v for k, v in results.items()}})
        return results

    def _autocast(self):
        if not self.amp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _check_finite(self, losses: dict[str, torch.Tensor], prediction_error: str | None = None) -> None:
        """Stop (on every rank together) when a loss or this rank's predictions are not finite."""
        bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v.detach()).all()}
        failed = bool(bad) or prediction_error is not None
        flag = torch.tensor([1.0 if failed else 0.0], device=self.device)
        if is_dist():
            # Every rank must stop together (a lone rank raising would leave the others waiting in backward).
            flag = all_reduce_mean(flag)
        if float(flag) == 0:
            return
        where = f"at iteration {self.iteration + 1}"
        advice = (
            f"Training stopped; no checkpoint was written for this iteration. {self._last_good()} Try a lower "
            f"solver.base_lr, gradient clipping (solver.clip_value) or solver.amp=false."
        )
        if prediction_error is not None:
            raise NonFiniteLossError(f"non-finite predictions {where} ({prediction_error}). {advice}")
        if bad:
            names = ", ".join(f"{k} = {v}" for k, v in sorted(bad.items()))
            raise NonFiniteLossError(f"non-finite loss {where}: {names}. {advice}")
        raise NonFiniteLossError(f"non-finite loss or predictions on another rank {where}. {advice}")

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train to ``train.max_iter`` (or ``stop_at`` iterations, checkpointing there: tests of resume)."""
        t = self.cfg.train
        max_iter = t.max_iter if stop_at is None else min(stop_at, t.max_iter)
        self._tb = self._open_tensorboard()
        if self.train_ds is None:
            raise ValueError("no training dataset")
        loader = build_train_loader(
            self.train_ds, self.batch_per_rank, t.seed, start=self.consumed, rank=self.rank, world_size=self.world,
            num_workers=self.cfg.data.num_workers,
        )  # fmt: skip
        data_iter = iter(loader)
        self.model.train()
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"training {type(self.model).__name__} ({n_params / 1e6:.2f} M parameters) on {self.device} x {self.world}, "
            f"{self.batch_per_rank} images/rank x {t.accumulate} accumulation, iterations {self.iteration} -> {max_iter}"
        )
        bar = None
        if self.rank == 0 and t.progress_bar:
            from tqdm import tqdm

            bar = tqdm(
                total=max_iter, initial=self.iteration, desc="train", dynamic_ncols=True, smoothing=0.05
            )
        start = time.perf_counter()
        stopped_early = False
        last_eval: dict[str, float] = {}
        try:
            while self.iteration < max_iter:
                if t.time_budget_s is not None:
                    elapsed = broadcast_object(time.perf_counter() - start)
                    if elapsed >= t.time_budget_s:
                        stopped_early = True
                        self.log(
                            f"time budget of {t.time_budget_s:.0f} s reached at iteration {self.iteration}"
                        )
                        break
                    self._maybe_drop_lr(elapsed)
                it_start = time.perf_counter()
                row = self._step(data_iter)
                row["time"] = time.perf_counter() - it_start
                self.iteration += 1
                self.consumed += t.ims_per_batch
                if self.rank == 0 and (self.iteration % t.log_period == 0 or self.iteration == max_iter):
                    self._write_metrics({"iteration": self.iteration, **row})
                if bar is not None:
                    bar.update(1)
                    postfix = {"loss": f"{row['total_loss']:.3f}", "lr": f"{row['lr']:.2e}"}
                    if t.time_budget_s is not None:
                        # tqdm's ETA counts max_iter; with a time budget the budget usually ends the run first
                        postfix["budget_left"] = (
                            f"{max(0.0, t.time_budget_s - (time.perf_counter() - start)):.0f}s"
                        )
                    bar.set_postfix(postfix, refresh=False)
                if (
                    t.checkpoint_period
                    and self.iteration % t.checkpoint_period == 0
                    and self.iteration < max_iter
                ):
                    self.save(f"model_{self.iteration:07d}.pth")
                if t.eval_period and self.iteration % t.eval_period == 0 and self.iteration < max_iter:
                    last_eval = self.evaluate()
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - start
        # The end of a run (max_iter or the time budget) is `model_final.pth`; `stop_at` leaves a periodic name.
        final_name = (
            "model_final.pth"
            if stop_at is None or self.iteration >= t.max_iter
            else f"model_{self.iteration:07d}.pth"
        )
        final = self.save(final_name)
        if stop_at is None or self.iteration >= t.max_iter:
            last_eval = self.evaluate() if (stopped_early or self.iteration >= t.max_iter) else last_eval
        if self._tb is not None:
            self._tb.close()
        return TrainResult(self.iteration, self.output_dir, final, last_eval, stopped_early, train_seconds)

    def _maybe_drop_lr(self, elapsed: float) -> None:
        """Time-budget LR step: scale the scheduler's base LRs by gamma once (saved with the scheduler state)."""
        t = self.cfg.train
        if (
            t.budget_lr_drop is None
            or t.time_budget_s is None
            or getattr(self.scheduler, "budget_dropped", False)
        ):
            return
        if elapsed >= t.budget_lr_drop * t.time_budget_s:
            gamma = self.cfg.solver.gamma
            self.scheduler.base_lrs = [b * gamma for b in self.scheduler.base_lrs]
            setattr(self.scheduler, "budget_dropped", True)  # noqa: B010 (saved with the scheduler's state dict)
            self.log(f"{elapsed:.0f} s of the {t.time_budget_s:.0f} s budget used: learning rate x{gamma} "
                     f"from iteration {self.iteration + 1}")  # fmt: skip

    def _step(self, data_iter) -> dict[str, Any]:
        t = self.cfg.train
        data_time = 0.0
        summed: dict[str, torch.Tensor] = {}
        for micro in range(t.accumulate):
            t0 = time.perf_counter()
            batch = next(data_iter)
            data_time += time.perf_counter() - t0
            images, targets = _to_device_targets(batch, self.device)
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if is_dist() and micro < t.accumulate - 1:
                # all-reduce gradients only once per optimizer step
                sync = cast(nn.parallel.DistributedDataParallel, self.ddp_model).no_sync()
            with sync:
                with self._autocast():
                    try:
                        losses = self.ddp_model(images, targets)
                        prediction_error = None
                    except NonFiniteCostError as e:
                        # the predictions went non-finite: the matcher sees them before any loss is computed
                        losses, prediction_error = {}, str(e)
                losses = {k: v.float() for k, v in losses.items()}
                self._check_finite(losses, prediction_error)
                loss = sum(losses.values()) / t.accumulate
                self.scaler.scale(loss).backward()
            for k, v in losses.items():
                summed[k] = summed.get(k, 0) + v.detach() / t.accumulate
        self.scaler.unscale_(self.optimizer)
        gnorm = clip_gradients(
            self.model.parameters(), self.cfg.solver.clip_value, self.cfg.solver.clip_norm_type
        )
        if gnorm is not None and not torch.isfinite(gnorm) and not self.scaler.is_enabled():
            raise NonFiniteLossError(
                f"non-finite gradient norm ({float(gnorm)}) at iteration {self.iteration + 1}; training stopped "
                f"without saving"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = max(g["lr"] for g in self.optimizer.param_groups)  # the base LR (the backbone's may be lower)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        logged = reduce_loss_dict(summed)
        row: dict[str, Any] = {"total_loss": sum(logged.values()), **logged, "lr": lr, "data_time": data_time}
        if gnorm is not None:
            row["grad_norm"] = float(gnorm)
        return row


def train(cfg: ExperimentConfig, resume: bool = False, model: nn.Module | None = None) -> TrainResult:
    """Build a :class:`Trainer` and run it (the ``maskdino train`` command)."""
    trainer = Trainer(cfg, resume=resume, model=model)
    result = trainer.run()
    if trainer.rank == 0 and result.metrics:
        print(f"[maskdino] final: {format_metrics(result.metrics)}", flush=True)
    return result
