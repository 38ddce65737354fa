"""COCO box/mask AP, panoptic PQ and semantic mIoU."""
