import torch
import torch.distributed as dist

from detr_core.distributed import reduce_num_boxes


def test_reduce_num_boxes_without_process_group():
    assert reduce_num_boxes(5, "cpu") == 5.0
    assert reduce_num_boxes(0, "cpu") == 1.0
    assert reduce_num_boxes(torch.tensor(3), "cpu") == 3.0


def test_reduce_num_boxes_single_rank_group(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert reduce_num_boxes(7, "cpu") == 7.0
        assert reduce_num_boxes(0.5, "cpu") == 1.0
    finally:
        dist.destroy_process_group()
