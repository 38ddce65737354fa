"""Under torch.distributed each rank's partial results reach rank 0 (2 gloo ranks on CPU)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp
    import sys

    import numpy as np
    import torch.distributed as dist

    from coco_eval import SemSegEvaluator
    from coco_eval.distributed import gather_to_main


    def run(rank, init_file, out):
        dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
        ev = SemSegEvaluator(num_classes=2)
        gt = np.array([[0, 1]])
        pred = np.array([[0, 1]]) if rank == 0 else np.array([[1, 1]])  # rank 1 gets pixel 0 wrong
        ev.process([{"sem_seg": gt}], [{"sem_seg": pred}])
        res = ev.evaluate()
        parts = gather_to_main(rank)
        if rank == 0:
            # confusion over both ranks: class 0 IoU 1/2, class 1 IoU 2/3
            assert abs(res["sem_seg/mIoU"] - 100 * (0.5 + 2 / 3) / 2) < 1e-9, res
            assert parts == [0, 1], parts
            open(out, "w").write("ok")
        else:
            assert res == {} and parts is None
        dist.destroy_process_group()


    if __name__ == "__main__":
        # fork: torch is imported once (spawn would import it again in every rank)
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=run, args=(r, sys.argv[1], sys.argv[2])) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(90)
        sys.exit(max(p.exitcode or 0 for p in procs))
    """
)


def test_two_gloo_ranks_gather_to_rank0(tmp_path):
    pytest.importorskip("torch.distributed")
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ok.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "init"), str(out)], capture_output=True,
                          text=True, timeout=120, env=env, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text() == "ok"
