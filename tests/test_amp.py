"""Mixed-precision training: bfloat16 autocast steps on CPU (fp32 losses, group-feature sums and
matching costs; a finite gradient for every parameter), the step runner that ``SOLVER.AMP``
selects, and a short run of the K-Net trainer with ``SOLVER.AMP.ENABLED True``."""

import json
import math
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from detectron2.engine import AMPTrainer
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from knet.engine import KNetTrainer, get_knet_cfg
from knet.engine.amp import AutocastTrainer, amp_dtype, build_amp_trainer
from knet.engine.solver import build_optimizer
from knet.modeling.criterion.matcher import HungarianMatcher

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/toy/knet_R18_toy_panoptic.yaml")
SMALL = ["MODEL.KNET.NUM_PROPOSALS", "8", "SOLVER.BASE_LR", "1e-4"]
TINY_RUN = [
    "MODEL.KNET.NUM_PROPOSALS", "4",
    "MODEL.KNET.NUM_STAGES", "1",
    "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]",
    "INPUT.MIN_SIZE_TRAIN", "(96, 112)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TEST", "()",
    "SOLVER.AMP.ENABLED", "True",
]  # fmt: skip
GROUP_SUM = "bnhw,bchw->bnc"  # the group-feature einsum of the kernel heads


def panoptic_sample(h, w, seed):
    """Two things (classes 0 and 2) on two stuff bands (classes 4 and 6)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
    sem_seg = torch.full((h, w), 4, dtype=torch.int64)
    sem_seg[h // 2 :] = 6
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 4 : h // 2, 6 : w // 2] = True
    masks[1, h // 2 : h - 3, w // 2 : w - 2] = True
    for c, m in zip((0, 2), masks):
        sem_seg[m] = c
        image[:, m] = torch.tensor([60 * c + 20, 200 - 40 * c, 90], dtype=torch.uint8)[:, None]
    instances = Instances((h, w))
    instances.gt_classes = torch.tensor([0, 2])
    instances.gt_masks = masks
    return {"image": image, "instances": instances, "sem_seg": sem_seg, "height": h, "width": w}


class Recorder:
    """Dtypes seen under autocast: group-feature sums, matching costs, head outputs, losses."""

    def __init__(self, model):
        self.group_sums, self.costs, self.head_dtypes, self.losses = [], [], [], []
        model.kernel_head.register_forward_hook(self.on_head)
        model.register_forward_hook(lambda m, i, out: self.losses.append(out))

    def on_head(self, module, inputs, out):
        self.head_dtypes.append({s["mask_logits"].dtype for s in out["stages"]})

    def patches(self):
        einsum, cost_matrix = torch.einsum, HungarianMatcher.cost_matrix

        def spy_einsum(equation, *operands):
            result = einsum(equation, *operands)
            if equation == GROUP_SUM:
                self.group_sums.append(result.dtype)
            return result

        def spy_cost(matcher, *args, **kwargs):
            cost = cost_matrix(matcher, *args, **kwargs)
            self.costs.append(cost.dtype)
            return cost

        return (
            mock.patch.object(torch, "einsum", spy_einsum),
            mock.patch.object(HungarianMatcher, "cost_matrix", spy_cost),
        )


# ----------------------------------------------------------------------------- dtype selection
def _cfg(*opts):
    return get_knet_cfg(CONFIG, list(opts))


def test_dtype_selection():
    assert _cfg().SOLVER.AMP.DTYPE == "auto"
    assert amp_dtype(_cfg("MODEL.DEVICE", "cpu")) == torch.bfloat16
    assert amp_dtype(_cfg("MODEL.DEVICE", "cuda")) == torch.float16
    assert amp_dtype(_cfg("MODEL.DEVICE", "cuda:0", "SOLVER.AMP.DTYPE", "bfloat16")) == (
        torch.bfloat16
    )
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        amp_dtype(_cfg("MODEL.DEVICE", "cpu", "SOLVER.AMP.DTYPE", "float16"))
    with pytest.raises(ValueError, match="'fp8'"):
        amp_dtype(_cfg("SOLVER.AMP.DTYPE", "fp8"))


def test_step_runner_per_device_and_dtype():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cpu = build_amp_trainer(_cfg("MODEL.DEVICE", "cpu"), model, [], optimizer)
    assert type(cpu) is AutocastTrainer and not hasattr(cpu, "grad_scaler")
    assert (cpu.device_type, cpu.dtype) == ("cpu", torch.bfloat16)
    cuda_bf16 = _cfg("MODEL.DEVICE", "cuda", "SOLVER.AMP.DTYPE", "bfloat16")
    runner = build_amp_trainer(cuda_bf16, model, [], optimizer)
    assert type(runner) is AutocastTrainer and runner.device_type == "cuda"
    with warnings.catch_warnings():  # without CUDA, its GradScaler warns that it is disabled
        warnings.simplefilter("ignore")
        runner = build_amp_trainer(_cfg("MODEL.DEVICE", "cuda"), model, [], optimizer)
    assert type(runner) is AMPTrainer  # Detectron2's, with its grad scaler


# ----------------------------------------------------------------------------- training steps
def test_bfloat16_autocast_steps_keep_fp32_where_it_matters():
    torch.manual_seed(0)
    cfg = _cfg(*SMALL)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    batches = [
        [panoptic_sample(64, 80, 2 * i), panoptic_sample(72, 56, 2 * i + 1)] for i in range(3)
    ]
    runner = AutocastTrainer(model, batches, optimizer, device_type="cpu", dtype=torch.bfloat16)
    record = Recorder(model)
    patches = record.patches()
    with EventStorage(0) as storage, patches[0], patches[1]:
        for it in range(len(batches)):
            runner.iter = storage.iter = it
            runner.run_step()
            bad = [
                n
                for n, p in model.named_parameters()
                if p.requires_grad and (p.grad is None or not bool(p.grad.isfinite().all()))
            ]
            assert bad == [], (it, bad)
    assert len(record.losses) == 3
    for losses in record.losses:
        assert all(v.dtype == torch.float32 and bool(torch.isfinite(v)) for v in losses.values())
    # autocast was active (bf16 mask logits), yet group sums and matching costs were fp32
    assert all(d == {torch.bfloat16} for d in record.head_dtypes), record.head_dtypes
    # per step: the initial head and 3 update stages pool group features
    assert record.group_sums == [torch.float32] * 4 * 3
    assert record.costs and set(record.costs) == {torch.float32}
    totals = [float(sum(losses.values())) for losses in record.losses]
    assert all(math.isfinite(t) for t in totals)


def test_semantic_model_bfloat16_step():
    torch.manual_seed(0)
    cfg = get_knet_cfg(str(REPO / "configs/toy/knet_upernet_R18_toy_semantic.yaml"))
    model = build_model(cfg).train()
    gen = torch.Generator().manual_seed(0)
    batch = [
        {
            "image": torch.randint(0, 256, (3, 64, 64), generator=gen, dtype=torch.uint8),
            "sem_seg": torch.randint(0, 7, (64, 64), generator=gen),
        }
        for _ in range(2)
    ]
    with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
        total = sum(losses.values())
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v)) for v in losses.values())
    total.backward()
    bad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not bool(p.grad.isfinite().all()))
    ]
    assert bad == []


# ----------------------------------------------------------------------------- inference
def output_dtypes(result) -> dict:
    """The dtypes of Detectron2's outputs of one image."""
    dtypes = {}
    if "panoptic_seg" in result:
        dtypes["panoptic_seg"] = result["panoptic_seg"][0].dtype
    if "instances" in result:
        inst = result["instances"]
        dtypes.update(masks=inst.pred_masks.dtype, boxes=inst.pred_boxes.tensor.dtype)
        dtypes.update(scores=inst.scores.dtype, classes=inst.pred_classes.dtype)
    if "sem_seg" in result:
        dtypes["sem_seg"] = result["sem_seg"].dtype
    return dtypes


@pytest.mark.parametrize(
    "config", ["knet_R18_toy_panoptic.yaml", "knet_upernet_R18_toy_semantic.yaml"]
)
def test_inference_under_autocast_returns_float32_outputs(config):
    """As Detectron2's model tests check under autocast: with ``MODEL.KNET.TEST.AMP_DTYPE`` the
    network runs in bfloat16 and the outputs keep their float32 / int32 / bool dtypes; inside a
    caller's autocast region a float32 model stays float32 and gives its float32 results."""
    torch.manual_seed(0)
    cfg = get_knet_cfg(
        str(REPO / "configs/toy" / config), ["MODEL.KNET.TEST.AMP_DTYPE", "bfloat16"]
    )
    model = build_model(cfg).eval()
    decoder_dtypes = []
    model.pixel_decoder.register_forward_hook(lambda m, i, out: decoder_dtypes.append(out[0].dtype))
    image = panoptic_sample(72, 88, seed=3)["image"]
    with torch.no_grad():
        amp = model([{"image": image}])[0]
        model.amp_dtype = None
        fp32 = model([{"image": image}])[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outer = model([{"image": image}])[0]
    assert decoder_dtypes == [torch.bfloat16, torch.float32, torch.float32]
    expected = {
        "panoptic_seg": torch.int32,
        "masks": torch.bool,
        "boxes": torch.float32,
        "scores": torch.float32,
        "classes": torch.int64,
        "sem_seg": torch.float32,
    }
    dtypes = output_dtypes(fp32)
    assert dtypes and dtypes == {k: expected[k] for k in dtypes}
    assert output_dtypes(amp) == output_dtypes(outer) == dtypes
    if "sem_seg" in fp32:
        torch.testing.assert_close(outer["sem_seg"], fp32["sem_seg"], rtol=1e-5, atol=1e-6)
    if "panoptic_seg" in fp32:
        assert torch.equal(outer["panoptic_seg"][0], fp32["panoptic_seg"][0])


@pytest.mark.slow
def test_trainer_runs_with_amp_enabled_on_cpu(tmp_path, toy_root):
    cfg = get_knet_cfg(CONFIG, [*TINY_RUN, "OUTPUT_DIR", str(tmp_path)])
    trainer = KNetTrainer(cfg)
    assert type(trainer._trainer) is AutocastTrainer
    assert trainer._trainer.dtype == torch.bfloat16
    trainer.resume_or_load(resume=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    losses = [v for v, _ in trainer.storage.histories()["total_loss"].values()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert [m["iteration"] for m in metrics if "total_loss" in m] == [2]  # the writer's period
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    # checkpoints carry the optimizer state, and it loads back into a fresh AMP trainer
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)
    saved = state["trainer"]["_trainer"]["optimizer"]["state"]
    assert state["iteration"] == 2 and saved
    resumed = KNetTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    loaded = resumed._trainer.optimizer.state_dict()["state"]
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k]["exp_avg"], saved[k]["exp_avg"]) for k in saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_amp_steps(tmp_path, toy_root, dtype):
    opts = [*TINY_RUN, "MODEL.DEVICE", "cuda", "SOLVER.AMP.DTYPE", dtype]
    cfg = get_knet_cfg(CONFIG, [*opts, "OUTPUT_DIR", str(tmp_path)])
    trainer = KNetTrainer(cfg)
    assert isinstance(trainer._trainer, AMPTrainer if dtype == "float16" else AutocastTrainer)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = [v for v, _ in trainer.storage.histories()["total_loss"].values()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


# bfloat16 vs float32 outputs of the toy panoptic model (random weights), largest over the scenes.
# Instances are compared index by index, as ranked by score: near-tied random-weight scores may
# swap two instances, hence the looser mask tolerance.
AMP_TOLERANCES = {
    "panoptic id map: pixels differing": 0.01,
    "instances: max score difference": 0.02,
    "instances: mask pixels differing": 0.2,
    "sem_seg: max abs difference": 0.1,
    "sem_seg: argmax pixels differing": 0.05,
}


@pytest.mark.slow
def test_bfloat16_inference_agrees_with_float32():
    """``MODEL.KNET.TEST.AMP_DTYPE auto`` (bfloat16 on the CPU) through ``DefaultPredictor``
    against float32 on two toy scenes: every output within :data:`AMP_TOLERANCES`."""
    from detectron2.engine import DefaultPredictor
    from make_toy_dataset import render_scene

    predictors = []
    for amp in ([], ["MODEL.KNET.TEST.AMP_DTYPE", "auto"]):
        cfg = get_knet_cfg(CONFIG, ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "128", *amp])
        torch.manual_seed(0)  # the same random weights for both
        predictors.append(DefaultPredictor(cfg))
    assert predictors[1].model.amp_dtype == torch.bfloat16
    worst = dict.fromkeys(AMP_TOLERANCES, 0.0)
    for seed in (0, 1):
        bgr = render_scene(seed, (128, 170))[0][:, :, ::-1]
        ref, got = (predictor(bgr) for predictor in predictors)
        pan = (ref["panoptic_seg"][0] != got["panoptic_seg"][0]).float().mean()
        scores = (ref["instances"].scores - got["instances"].scores).abs().max()
        masks = (ref["instances"].pred_masks != got["instances"].pred_masks).float().mean()
        sem = (ref["sem_seg"] - got["sem_seg"]).abs().max()
        argmax = (ref["sem_seg"].argmax(0) != got["sem_seg"].argmax(0)).float().mean()
        for key, value in zip(AMP_TOLERANCES, (pan, scores, masks, sem, argmax)):
            worst[key] = max(worst[key], float(value))
    assert all(worst[k] <= tol for k, tol in AMP_TOLERANCES.items()), worst
