"""Training does not depend on the number of processes: with ``MODEL.KNET.GLOBAL_BATCH_LOSSES``
and "SyncBN", two processes holding 2 + 2 images compute the losses, gradients and BN buffers
of one process holding the 4, and ``train_net.py`` ends with the same weights in 1 and 2
processes.

Tolerances. One step, in float64: losses, gradients and BN buffers within 1e-5 of each
tensor's largest magnitude (measured about 2e-6: the targets and matching costs stay float32).
Float32 is not used for the one-step check because at initialisation many mask logits sit at
K-Net's hard 0.5 threshold of the group features: a last-bit difference flips pixels and moves
some gradients by percents (with the threshold out of reach, float32 agrees to 1e-5 too).
Whole runs, float32, the toy config below (3 steps of AdamW at lr 5e-4): every state-dict
entry within 2e-3 of max(its largest magnitude, 1); measured 1.3e-4 on one CPU, 6e-6 on
another. Rounding grows about fivefold per step (on the first CPU: 7e-4, 3e-3 and 1.1e-2 after
4, 5 and 6 steps), as AdamW's first steps turn near-zero gradients into steps of about lr and
the hard threshold turns those into other pixel sets; so the runs are short. Batches split
wrongly between the processes would move the BN running statistics by far more.
"""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from knet.engine import get_knet_cfg
from knet.engine.launch import create_ddp_model
from knet.engine.trainer import check_global_batch
from knet.modeling import HungarianMatcher, KNetCriterion, KNetSemanticCriterion
from knet.modeling.batch_norm import GlobalBatchNorm2d, share_cpu_batch_statistics

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs/toy/knet_R18_toy_panoptic.yaml")
SMALL = ["MODEL.KNET.NUM_PROPOSALS", "6", "MODEL.KNET.NUM_STAGES", "2",
         "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0, 1.0]"]  # fmt: skip
STEP_TOLERANCE = 1e-5
TRAINED_TOLERANCE = 2e-3
WORLD = 2


def assert_close(got, expected, tolerance: float, msg: str = "", floor: float = 0.0) -> None:
    """max |got - expected| <= tolerance * max(max |expected|, floor) (integers: equal): the
    tolerance is relative to the tensor's scale, not per element (near-zero elements of a
    gradient carry the rounding of the large ones); ``floor`` 1 makes it absolute for weights
    below 1 (biases that start at 0)."""
    assert got.shape == expected.shape, msg
    if not expected.is_floating_point():
        assert torch.equal(got, expected), msg
        return
    error = float((got.double() - expected.double()).abs().max())
    scale = max(float(expected.double().abs().max()), floor)
    assert error <= tolerance * scale, f"{msg}: {error:.3g} > {tolerance:g} x {scale:.3g}"


# ------------------------------------------------------------------------------ inputs
def _sample(h: int, w: int, seed: int) -> dict:
    """A panoptic training input of the toy classes (4 things, 3 stuff), random rectangles."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
    sem_seg = torch.full((h, w), 255, dtype=torch.int64)
    sem_seg[: h // 2] = 4 + seed % 3
    classes, masks = [], []
    for c in range(1 + seed % 3):
        y0, x0 = (int(v) for v in torch.randint(0, min(h, w) // 2, (2,), generator=gen))
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = True
        sem_seg[mask] = c
        image[:, mask] = torch.tensor([60 * c, 200 - 40 * c, 90], dtype=torch.uint8)[:, None]
        classes.append(c)
        masks.append(mask)
    instances = Instances((h, w))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    instances.gt_masks = torch.stack(masks)
    return {"image": image, "instances": instances, "sem_seg": sem_seg}


# process 0's images pad to 64x96, process 1's to 96x96 (one process: 96x96)
SIZES = [(64, 64), (60, 90), (96, 64), (70, 90)]


def _batch() -> list[dict]:
    return [_sample(h, w, seed) for seed, (h, w) in enumerate(SIZES)]


def _model(global_batch_losses: bool) -> torch.nn.Module:
    """The toy model in float64: at initialisation many mask logits sit near the hard 0.5
    threshold of the group features, where float32 rounding (of BN's sums in another order)
    flips pixels and changes gradients by percents; float64 makes such flips negligible."""
    torch.manual_seed(0)
    opts = [*SMALL, "MODEL.KNET.GLOBAL_BATCH_LOSSES", str(global_batch_losses)]
    return build_model(get_knet_cfg(TOY, opts)).double().train()


def _train_step(model: torch.nn.Module, batch: list[dict]) -> dict:
    """One forward / backward: the losses, the (DDP-averaged) gradients and the BN buffers."""
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    module = getattr(model, "module", model)
    return {
        "losses": {k: v.detach() for k, v in losses.items()},
        "grads": {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in module.named_buffers() if "running" in n},
        "counts": {n: b.clone() for n, b in module.named_buffers() if "num_batches" in n},
    }


def _bn_input(images: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """4 images of 3 channels (different values per image) and the weights of a loss on BN's
    output, or the ``images`` of these."""
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(1)) * 3 + 1
    return x[images], torch.linspace(-1, 2, x.numel()).view_as(x)[images]


def _bn_step(x: torch.Tensor, loss_weights: torch.Tensor, bn: torch.nn.Module) -> dict:
    """BN training step: output, input gradient of a fixed loss, weight gradient, buffers."""
    x = x.clone().requires_grad_()
    y = bn(x)
    (y * loss_weights).sum().backward()
    return {
        "y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad,
        "running_mean": bn.running_mean, "running_var": bn.running_var,
        "num_batches_tracked": bn.num_batches_tracked,
    }  # fmt: skip


# ------------------------------------------------------------------------------ 2 processes
def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        # BN: each process normalises its 2 of 4 images (different values per image)
        bn = share_cpu_batch_statistics(torch.nn.SyncBatchNorm(3))
        assert isinstance(bn, GlobalBatchNorm2d)
        bn_out = _bn_step(*_bn_input(slice(2 * rank, 2 * rank + 2)), bn)
        dist.all_reduce(bn_out["weight_grad"])  # what DDP does (the sum; the loss is a sum)
        results["bn"] = bn_out
        # unequal shares (1 + 3 images): the statistics from all-reduced sums
        uneven = _bn_step(
            *_bn_input(slice(0, 1) if rank == 0 else slice(1, 4)), GlobalBatchNorm2d(3)
        )
        dist.all_reduce(uneven["weight_grad"])
        results["bn_uneven"] = uneven
        # the model: images 2 * rank and 2 * rank + 1, through DDP as in training
        batch = _batch()[2 * rank : 2 * rank + 2]
        for flag in (True, False):
            model = create_ddp_model(_model(flag), broadcast_buffers=False)
            results[flag] = _train_step(model, batch)
        torch.save(results, f"{out}/rank{rank}.pth")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes() -> list[dict]:
    """Each process's results of the BN and model steps (one spawn for all the checks)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        return [torch.load(f"{tmp}/rank{r}.pth", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("shares", ["bn", "bn_uneven"], ids=["2+2 images", "1+3 images"])
def test_synchronised_bn_equals_one_process_bn(two_processes, shares):
    """Outputs, gradients and every buffer (unbiased running variance, batch count) of BN over
    2 + 2 (gathered batch) or 1 + 3 images (all-reduced sums) in two processes are those of
    ``nn.BatchNorm2d`` over the 4 in one; with equal shares the outputs and buffers bit for
    bit."""
    ref = _bn_step(*_bn_input(), torch.nn.BatchNorm2d(3))
    got = [r[shares] for r in two_processes]
    for key in ("y", "x_grad"):
        assert_close(torch.cat([g[key] for g in got]), ref[key], STEP_TOLERANCE, key)
    for key in ("weight_grad", "running_mean", "running_var", "num_batches_tracked"):
        for g in got:
            assert_close(g[key], ref[key], STEP_TOLERANCE, key)
    if shares == "bn":
        assert torch.equal(torch.cat([g["y"] for g in got]), ref["y"])
        assert all(torch.equal(g["running_var"], ref["running_var"]) for g in got)


def test_two_processes_compute_the_one_process_gradients(two_processes):
    """The toy model (SyncBN) on 2 + 2 images of different sizes in two processes, through
    DDP: with GLOBAL_BATCH_LOSSES the losses (mean over processes), gradients and BN buffers
    are those of one process on the 4 images; with the official per-process padding and
    normalisers they are not."""
    ref = _train_step(_model(True), _batch())
    got = [r[True] for r in two_processes]
    for key, value in ref["losses"].items():
        mean = sum(g["losses"][key] for g in got) / WORLD
        assert_close(mean, value, STEP_TOLERANCE, key)
    assert ref["grads"].keys() == got[0]["grads"].keys()
    for kind in ("grads", "buffers", "counts"):
        for name, value in ref[kind].items():
            for g in got:
                assert_close(g[kind][name], value, STEP_TOLERANCE, name)
    official = two_processes[0][False]["grads"]
    worst = max(
        float((official[n] - v).abs().max() / v.abs().max()) for n, v in ref["grads"].items()
    )
    assert worst > 1e-2  # the test sees what the option changes


# ------------------------------------------------------------------------------ 1 process
def _criterion(global_batch_losses: bool) -> KNetCriterion:
    return KNetCriterion(
        matcher=HungarianMatcher(), num_classes=7, num_thing_classes=4, num_proposals=6,
        stage_loss_weights=[1.0], global_batch_losses=global_batch_losses,
    )  # fmt: skip


def test_one_process_losses_are_the_same_either_way():
    """GLOBAL_BATCH_LOSSES changes nothing in one process, bit for bit: losses and gradients
    of the set criterion, and of the semantic one (also dividing by non-ignored pixels)."""
    gen = torch.Generator().manual_seed(0)
    b, n, h, w = 3, 9, 16, 20
    outputs = {
        "init": {"mask_logits": torch.randn(b, 6, h, w, generator=gen),
                 "seg_logits": torch.randn(b, 7, h, w, generator=gen)},
        "stages": [{"mask_logits": torch.randn(b, n, h, w, generator=gen),
                    "cls_logits": torch.randn(b, n, 7, generator=gen)}],
    }  # fmt: skip
    none = torch.zeros(0, dtype=torch.int64)
    targets = [
        {"labels": torch.tensor([i % 4, 1])[: i + 1], "masks": torch.rand(i + 1, h, w),
         "stuff_labels": torch.tensor([4 + i]), "stuff_masks": torch.rand(1, h, w).round()}
        for i in range(2)
    ] + [{"labels": none, "masks": torch.zeros(0, h, w), "stuff_labels": none,
          "stuff_masks": torch.zeros(0, h, w)}]  # fmt: skip

    def run(criterion, outputs):
        leaves = [t.clone().requires_grad_() for t in _flat(outputs)]
        losses = criterion(_unflat(outputs, iter(leaves)), targets)
        sum(losses.values()).backward()
        return losses, [t.grad for t in leaves]

    official, official_grads = run(_criterion(False), outputs)
    new, new_grads = run(_criterion(True), outputs)
    assert official.keys() == new.keys()
    assert all(torch.equal(official[k], new[k]) for k in official)
    assert all(torch.equal(a, b) for a, b in zip(official_grads, new_grads))

    labels = torch.randint(0, 5, (2, 12, 12), generator=gen)
    labels[:, :3] = 255
    seg = {"init": {"seg_logits": torch.randn(2, 5, 6, 6, generator=gen)}, "stages": []}
    semantic = [
        KNetSemanticCriterion(stage_loss_weights=[], avg_non_ignore=True, global_batch_losses=g)
        for g in (False, True)
    ]
    assert torch.equal(
        semantic[0](seg, labels)["loss_init_ce"], semantic[1](seg, labels)["loss_init_ce"]
    )


def _flat(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree
    return [t for v in values for t in _flat(v)]


def _unflat(tree, leaves):
    if isinstance(tree, torch.Tensor):
        return next(leaves)
    if isinstance(tree, dict):
        return {k: _unflat(v, leaves) for k, v in tree.items()}
    return [_unflat(v, leaves) for v in tree]


def test_one_process_sync_bn_is_bn():
    """In one process the CPU layer of "SyncBN" is ``nn.BatchNorm2d``, bit for bit."""
    got = _bn_step(*_bn_input(), GlobalBatchNorm2d(3))
    ref = _bn_step(*_bn_input(), torch.nn.BatchNorm2d(3))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_cpu_sync_bn_layers_keep_their_parameters_and_buffers():
    """The conversion keeps the very tensors (an optimizer built before still trains them)."""
    model = _model(True)
    before = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    share_cpu_batch_statistics(model)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


def test_uneven_global_batch_is_an_error_naming_both_numbers():
    check_global_batch(4, 2)
    check_global_batch(4, 4)
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH \(4\) .* processes \(3\)"):
        check_global_batch(4, 3)


# ------------------------------------------------------------------------------ whole runs
TRAIN = [
    "--config-file", TOY,
    "MODEL.KNET.NUM_PROPOSALS", "4", "MODEL.KNET.NUM_STAGES", "1",
    "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]", "INPUT.MIN_SIZE_TRAIN", "(96, 96)",
    "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "100",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(args: list[str], out: Path, copies: int = 1) -> dict:
    """Run ``python *args TRAIN`` (``copies`` commands at once, "machine" i gets
    ``--machine-rank i``) and return the final weights."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    # consoles go to files: a command's unread pipe would block it while we wait for another
    out.mkdir(parents=True, exist_ok=True)
    procs, logs = [], [out / f"console.{i}.log" for i in range(copies)]
    for i, log in enumerate(logs):
        command = [sys.executable, *[a.replace("{i}", str(i)) for a in args], *TRAIN]
        with log.open("w") as console:
            procs.append(
                subprocess.Popen(
                    [*command, "OUTPUT_DIR", str(out)],
                    cwd=REPO,
                    env=env,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                )
            )
    for proc, log in zip(procs, logs):
        proc.wait(timeout=600)
        assert proc.returncode == 0, log.read_text()[-3000:]
    return torch.load(out / "model_final.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory, toy_root) -> dict:
    out = tmp_path_factory.mktemp("one")
    return _train(["train_net.py"], out)


def _assert_same_weights(weights: dict, reference: dict) -> None:
    assert weights.keys() == reference.keys()
    for key, value in weights.items():
        assert_close(value, reference[key], TRAINED_TOLERANCE, key, floor=1.0)


@pytest.mark.slow
def test_two_processes_train_to_the_one_process_weights(tmp_path, one_process_weights):
    """``train_net.py --num-gpus 2`` (2 x 2 images) ends with the weights, BN buffers
    included, of one process training on the same global batches of 4."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    weights = _train(["train_net.py", "--num-gpus", "2", "--dist-url", url], tmp_path)
    _assert_same_weights(weights, one_process_weights)


@pytest.mark.slow
def test_two_torchrun_machines_train_to_the_one_process_weights(tmp_path, one_process_weights):
    """Two torchrun "machines" of one process each (on loopback): the one-process weights."""
    endpoint = f"127.0.0.1:{_free_port()}"
    torchrun = [
        "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--node-rank", "{i}", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
        "train_net.py",
    ]  # fmt: skip
    weights = _train(torchrun, tmp_path, copies=2)
    _assert_same_weights(weights, one_process_weights)
