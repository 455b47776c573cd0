"""The real trainer in 2 CPU processes (gloo), as ``train_net.py --num-gpus 2`` runs it."""

import json
import math
from pathlib import Path

import pytest
import torch

from knet.engine import launch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "panoptic": (
        "configs/toy/knet_R18_toy_panoptic.yaml",
        ["MODEL.KNET.NUM_PROPOSALS", "4", "MODEL.KNET.NUM_STAGES", "1",
         "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]", "INPUT.MIN_SIZE_TRAIN", "(96, 112)",
         "INPUT.MAX_SIZE_TRAIN", "128"],
    ),
    "semantic": (
        "configs/toy/knet_upernet_R18_toy_semantic.yaml",
        ["INPUT.MIN_SIZE_TRAIN", "(80, 96)", "INPUT.MAX_SIZE_TRAIN", "128",
         "INPUT.CROP.SIZE", "(64, 64)"],
    ),
}  # fmt: skip
COMMON = [
    "SOLVER.IMS_PER_BATCH", "4",  # 2 images per process
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TEST", "()",
]  # fmt: skip


def _train(config: str, opts: list, out: str, resume: bool) -> None:
    """Runs in each process: train, then write this rank's weights and losses."""
    from detectron2.utils import comm

    from knet.engine import KNetTrainer, get_knet_cfg

    cfg = get_knet_cfg(str(REPO / config), [*opts, "OUTPUT_DIR", out])
    trainer = KNetTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    rank = comm.get_rank()
    model = trainer.model
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    torch.save(model.module.state_dict(), f"{out}/rank{rank}_weights.pth")
    # the main process logs the losses averaged over both processes
    history = trainer.storage.histories().get("total_loss")
    losses = {str(i): v for v, i in history.values()} if history else {}
    saves = trainer.checkpointer.save_to_disk
    Path(f"{out}/rank{rank}.json").write_text(json.dumps({"losses": losses, "saves": saves}))


def _run(task: str, out: Path, max_iter: int, resume: bool = False) -> dict:
    config, opts = CONFIGS[task]
    opts = [*opts, *COMMON, "SOLVER.MAX_ITER", str(max_iter)]
    launch(_train, 2, dist_url="auto", args=(config, opts, str(out), resume))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(out / f"rank{r}_weights.pth", weights_only=True) for r in range(2)]
    diverged = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    # every parameter must be identical; so must the BN running statistics of the toy configs
    # ("SyncBN"), which a config with plain "BN" keeps per process, as Detectron2 does
    assert all(k.endswith(("running_mean", "running_var")) for k in diverged), diverged
    assert [r["saves"] for r in ranks] == [True, False]  # only rank 0 writes checkpoints
    assert not ranks[1]["losses"]
    assert ranks[0]["losses"] and all(math.isfinite(v) for v in ranks[0]["losses"].values())
    return ranks[0]["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["panoptic", "semantic"])
def test_two_process_training_and_resume(task, tmp_path, toy_root):
    out = tmp_path / task
    losses = _run(task, out, max_iter=3)
    assert sorted(losses) == ["0", "1", "2"]
    checkpoints = sorted(p.name for p in out.glob("model_*.pth"))
    assert checkpoints == ["model_0000001.pth", "model_final.pth"]
    if task == "panoptic":  # --resume in 2 processes continues at iteration 3
        resumed = _run(task, out, max_iter=5, resume=True)
        assert sorted(resumed) == ["3", "4"]
