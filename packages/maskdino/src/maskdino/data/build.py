"""Samplers, collation and dataset construction from a :class:`~maskdino.config.DataConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from maskdino.data.ade import SemanticDataset, load_sem_seg
from maskdino.data.coco import DatasetMetadata, InstanceDataset, RecordDataset, load_coco_instances
from maskdino.data.errors import DataError
from maskdino.data.panoptic import PanopticDataset, load_coco_panoptic
from maskdino.data.synthetic import generate_synthetic, synthetic_paths
from maskdino.data.transforms import LargeScaleJitter, ResizeShortestEdge

__all__ = [
    "EvalSpec",
    "InferenceSampler",
    "TrainingSampler",
    "build_datasets",
    "build_test_loader",
    "build_train_loader",
    "collate_list",
    "sample_seed",
]


def collate_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep a batch as a list of per-image dicts (images differ in size; the model pads them itself)."""
    return list(batch)


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of the sample at global stream ``position`` (a 63-bit mix of both numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (1 << 64)
    x ^= x >> 32
    return x % (1 << 63)


class TrainingSampler(Sampler):
    """Infinite, resumable, rank-sharded stream of batches of ``(dataset_index, augmentation_seed)``.

    The global stream is a concatenation of per-epoch permutations (epoch ``e`` shuffled with
    ``seed + e``). A global batch is ``world_size * batch_size`` consecutive stream positions; rank ``r``
    takes its ``r``-th chunk. So a run on W ranks sees exactly the samples (and augmentations) of a
    single-process run with a ``W`` times larger batch, and ``start`` (samples already consumed, all ranks
    together) resumes the stream exactly where a checkpoint left it.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if size <= 0:
            raise DataError("TrainingSampler: the training set is empty")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.size, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm[offset]

    def __iter__(self):
        pos = self.start
        step = self.batch_size * self.world_size
        while True:
            first = pos + self.rank * self.batch_size
            yield [(self._index(p), sample_seed(self.seed, p)) for p in range(first, first + self.batch_size)]
            pos += step


class InferenceSampler(Sampler):
    """Each rank gets a contiguous, disjoint shard of ``range(size)`` (in order)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        per = (size + world_size - 1) // world_size
        self.indices = list(range(min(size, rank * per), min(size, (rank + 1) * per)))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class EvalSpec:
    """What the val split can be evaluated with (paths of ground truth)."""

    instances_json: str | None = None
    panoptic_json: str | None = None
    panoptic_dir: str | None = None
    semantic: bool = False


def _on_main_process_first(fn) -> None:
    """Run ``fn`` on rank 0 only, then let every rank of a torch.distributed job continue (e.g. generating data)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        fn()
    if distributed:
        dist.barrier()


def _require(value: str | None, key: str) -> str:
    if not value:
        raise DataError(f"data.{key} must be set for this data.kind")
    return value


def build_datasets(data_cfg, num_classes: int | None = None, splits: tuple[str, ...] = ("train", "val")):
    """Build ``(train_dataset | None, val_dataset | None, metadata, eval_spec)`` for ``data_cfg``.

    ``num_classes`` (the model's) is checked against the dataset's class count.
    """
    c = data_cfg
    train_tf = LargeScaleJitter(c.image_size, c.min_scale, c.max_scale, c.flip_prob)
    test_tf = ResizeShortestEdge(c.test_short_edge, c.test_max_size, backend=c.test_resize)
    train_ds: RecordDataset | None = None
    val_ds: RecordDataset | None = None
    meta: DatasetMetadata | None = None
    spec = EvalSpec()
    if c.kind in ("synthetic", "coco_panoptic"):
        if c.kind == "synthetic":
            _on_main_process_first(
                lambda: generate_synthetic(
                    c.root, c.synthetic_seed, c.synthetic_train, c.synthetic_val, c.synthetic_size
                )
            )
            tr, va = synthetic_paths(c.root, "train"), synthetic_paths(c.root, "val")
            train_args: tuple[str | Path, ...] = (tr["panoptic_json"], tr["panoptic"], tr["images"])
            val_args: tuple[str | Path, ...] = (va["panoptic_json"], va["panoptic"], va["images"])
            inst_json = str(va["instances_json"])
        else:
            train_args = (_require(c.train_json, "train_json"), _require(c.train_panoptic, "train_panoptic"),
                          _require(c.train_images, "train_images"))  # fmt: skip
            val_args = (_require(c.val_json, "val_json"), _require(c.val_panoptic, "val_panoptic"),
                        _require(c.val_images, "val_images"))  # fmt: skip
            inst_json = c.val_instances_json
        meta = None
        if "train" in splits:
            recs, meta = load_coco_panoptic(*train_args, filter_empty=c.filter_empty)
            train_ds = PanopticDataset(recs, meta, train_tf)
        if "val" in splits:
            recs, vmeta = load_coco_panoptic(*val_args, metadata=meta)
            meta = meta or vmeta
            val_ds = PanopticDataset(recs, meta, test_tf)
            spec = EvalSpec(instances_json=inst_json, panoptic_json=str(val_args[0]), panoptic_dir=str(val_args[1]),
                            semantic=True)  # fmt: skip
    elif c.kind == "coco_instance":
        meta = None
        if "train" in splits:
            recs, meta = load_coco_instances(
                _require(c.train_json, "train_json"), _require(c.train_images, "train_images"),
                filter_empty=c.filter_empty,
            )  # fmt: skip
            train_ds = InstanceDataset(recs, meta, train_tf)
        if "val" in splits:
            vj = _require(c.val_json, "val_json")
            recs, vmeta = load_coco_instances(vj, _require(c.val_images, "val_images"), metadata=meta)
            meta = meta or vmeta
            val_ds = InstanceDataset(recs, meta, test_tf)
            spec = EvalSpec(instances_json=vj)
    elif c.kind == "semantic":
        if num_classes is None:
            raise DataError("semantic datasets need the model's num_classes")
        names = c.class_names or None
        meta = None
        if "train" in splits:
            recs, meta = load_sem_seg(_require(c.train_images, "train_images"), _require(c.train_labels, "train_labels"),
                                      num_classes, names)  # fmt: skip
            train_ds = SemanticDataset(recs, meta, train_tf)
        if "val" in splits:
            recs, vmeta = load_sem_seg(_require(c.val_images, "val_images"), _require(c.val_labels, "val_labels"),
                                       num_classes, names)  # fmt: skip
            meta = meta or vmeta
            val_ds = SemanticDataset(recs, meta, test_tf)
            spec = EvalSpec(semantic=True)
    else:
        raise DataError(f"unknown data.kind {c.kind!r}")
    assert meta is not None
    if num_classes is not None and meta.num_classes != num_classes:
        raise DataError(
            f"the dataset has {meta.num_classes} classes ({meta.names[:5]}...) but model.num_classes is {num_classes}"
        )
    if val_ds is not None and c.max_val_images:
        val_ds.records = val_ds.records[: c.max_val_images]
    return train_ds, val_ds, meta, spec


def build_train_loader(
    dataset,
    batch_size: int,
    seed: int,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    sampler = TrainingSampler(len(dataset), batch_size, seed, rank, world_size, start)
    # A private generator: the DataLoader draws its worker base seed from it instead of from the global
    # torch RNG, which therefore stays exactly as a checkpoint restored it.
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_list,
        num_workers=num_workers,
        generator=gen,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def build_test_loader(dataset, rank: int = 0, world_size: int = 1, batch_size: int = 1, num_workers: int = 0):
    return DataLoader(
        dataset,
        sampler=InferenceSampler(len(dataset), rank, world_size),
        batch_size=batch_size,
        collate_fn=collate_list,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )


def metadata_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "metadata.json"


def save_metadata(meta: DatasetMetadata, output_dir: str | Path) -> None:
    import json

    p = metadata_path(output_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(meta.to_dict(), indent=1))
