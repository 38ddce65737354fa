"""Datasets (COCO instance/panoptic, ADE-style semantic, synthetic shapes), LSJ augmentation, loaders."""

from maskdino.data.ade import SemanticDataset, load_sem_seg
from maskdino.data.build import (
    EvalSpec,
    InferenceSampler,
    TrainingSampler,
    build_datasets,
    build_test_loader,
    build_train_loader,
    collate_list,
)
from maskdino.data.coco import DatasetMetadata, InstanceDataset, load_coco_instances, read_image
from maskdino.data.errors import DataError
from maskdino.data.panoptic import PanopticDataset, load_coco_panoptic
from maskdino.data.synthetic import generate_synthetic
from maskdino.data.transforms import LargeScaleJitter, ResizeShortestEdge

__all__ = [
    "DataError",
    "DatasetMetadata",
    "EvalSpec",
    "InferenceSampler",
    "InstanceDataset",
    "LargeScaleJitter",
    "PanopticDataset",
    "ResizeShortestEdge",
    "SemanticDataset",
    "TrainingSampler",
    "build_datasets",
    "build_test_loader",
    "build_train_loader",
    "collate_list",
    "generate_synthetic",
    "load_coco_instances",
    "load_coco_panoptic",
    "load_sem_seg",
    "read_image",
]
