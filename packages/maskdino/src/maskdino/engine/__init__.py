"""Training and evaluation: the train loop (:mod:`.trainer`), evaluation on a val split (:mod:`.evaluation`),
optimizer and schedule (:mod:`.optim`), metrics logging (:mod:`.metrics`), torch.distributed helpers
(:mod:`.distributed`) and the CPU demo (:mod:`.demo`)."""

from maskdino.engine.trainer import NonFiniteLossError, Trainer, TrainResult, train

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "train"]
