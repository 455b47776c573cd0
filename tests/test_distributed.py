"""The class-loss normaliser is averaged over workers (checked with a 2-process gloo group)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        from knet.modeling.criterion import all_reduce_mean

        local = torch.tensor(float(3 + 4 * rank))  # 3 positives on rank 0, 7 on rank 1
        results[rank] = float(all_reduce_mean(local))
        results[f"local{rank}"] = float(local)  # the input is not modified in place
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_mean_over_two_gloo_workers():
    world_size = 2
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(
            _worker,
            args=(world_size, os.path.join(tmp, "init"), results),
            nprocs=world_size,
            join=True,
        )
        assert results[0] == results[1] == 5.0
        assert results["local0"] == 3.0 and results["local1"] == 7.0


def test_all_reduce_mean_without_process_group_is_identity():
    from knet.modeling.criterion import all_reduce_mean

    assert float(all_reduce_mean(torch.tensor(4.0))) == 4.0
