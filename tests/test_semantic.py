"""Semantic K-Net: the cross-entropy losses, the semantic kernel head, the meta-architecture in
semantic mode (training, inference, odd sizes, all-ignore labels, errors) and multi-scale/flip
test-time augmentation."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from knet.engine import get_knet_cfg
from knet.engine.tta import SemanticSegmentorWithTTA
from knet.modeling import SemanticKNet
from knet.modeling.criterion import KNetSemanticCriterion
from knet.modeling.criterion.losses import semantic_cross_entropy
from knet.modeling.kernel_head import KernelUpdateHead, KNetSemanticKernelHead

ROOT = Path(__file__).resolve().parents[1]
TOY_SEMANTIC = str(ROOT / "configs/toy/knet_upernet_R18_toy_semantic.yaml")
NUM_CLASSES = 7


def build(opts=(), seed=0):
    torch.manual_seed(seed)
    cfg = get_knet_cfg(TOY_SEMANTIC, list(opts))
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def semantic_model():
    return build()[1]


def sample(h, w, seed=0, ignore_frac=0.1):
    """A training input like the semantic mapper's: a few class bands and some void pixels."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
    sem_seg = torch.zeros(h, w, dtype=torch.int64)
    for i, c in enumerate(torch.randperm(NUM_CLASSES, generator=gen)[:3].tolist()):
        sem_seg[i * h // 3 :] = c
        image[:, i * h // 3 :] = (image[:, i * h // 3 :] // 4 + 60 * c).clamp(max=255)
    sem_seg[torch.rand(h, w, generator=gen) < ignore_frac] = 255
    return {"image": image, "sem_seg": sem_seg, "height": h, "width": w}


# ----------------------------------------------------------------------------- losses
def numpy_cross_entropy(logits, labels, ignore, avg_non_ignore):
    """Independent reference: (B, K, H, W) logits at the label size, (B, H, W) labels."""
    x = logits.double().numpy()
    y = labels.numpy()
    log_p = x - x.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    valid = y != ignore
    picked = np.take_along_axis(log_p, np.where(valid, y, 0)[:, None], axis=1)[:, 0]
    total = -(picked * valid).sum()
    return total / (valid.sum() if avg_non_ignore else y.size)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_matches_numpy(avg_non_ignore):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=gen)
    labels = torch.randint(0, 5, (2, 6, 7), generator=gen)
    labels[0, :2] = 255
    loss = semantic_cross_entropy(logits, labels, 255, avg_non_ignore)
    expected = numpy_cross_entropy(logits, labels, 255, avg_non_ignore)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    if not avg_non_ignore:  # MMSeg 0.x: ignored pixels count in the denominator
        assert loss.item() < semantic_cross_entropy(logits, labels, 255, True).item()


def test_cross_entropy_resizes_logits_to_the_label_size():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 5, 6, generator=gen)
    labels = torch.randint(0, 4, (1, 20, 24), generator=gen)
    up = F.interpolate(logits, size=(20, 24), mode="bilinear", align_corners=False)
    expected = numpy_cross_entropy(up, labels, 255, False)
    assert semantic_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_all_ignored_is_zero_with_zero_gradient(avg_non_ignore):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 4, 4), 255)
    loss = semantic_cross_entropy(logits, labels, 255, avg_non_ignore)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.count_nonzero(logits.grad) == 0


def test_criterion_weights_and_keys():
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (2, 8, 8), generator=gen)
    logits = [torch.randn(2, 4, 4, 4, generator=gen) for _ in range(5)]
    outputs = {
        "init": {"seg_logits": logits[0]},
        "stages": [{"seg_logits": x} for x in logits[1:4]],
    }
    criterion = KNetSemanticCriterion(
        init_weight=0.5, stage_loss_weights=[1.0, 2.0, 3.0], aux_weight=0.4
    )
    losses = criterion(outputs, labels, logits[4])
    assert list(losses) == ["loss_init_ce", "s0_loss_ce", "s1_loss_ce", "s2_loss_ce", "loss_aux_ce"]
    weights = [0.5, 1.0, 2.0, 3.0, 0.4]
    for (key, value), x, weight in zip(losses.items(), logits, weights):
        assert value.item() == pytest.approx(weight * semantic_cross_entropy(x, labels).item()), key
    assert "loss_aux_ce" not in criterion(outputs, labels, None)
    with pytest.raises(ValueError, match="stage loss weights"):
        KNetSemanticCriterion(stage_loss_weights=[1.0])(outputs, labels)


# ----------------------------------------------------------------------------- kernel head
def _semantic_head(channels=32, updator=16, classes=5, stages=2):
    stage_list = [
        KernelUpdateHead(
            num_classes=0,
            channels=channels,
            num_heads=4,
            dim_feedforward=64,
            updator_channels=updator,
            hard_mask_threshold=None,
            xavier_init=False,
        )
        for _ in range(stages)
    ]
    return KNetSemanticKernelHead(
        channels=channels, num_classes=classes, stages=stage_list, dropout=0.1
    )


def test_semantic_head_chains_classifier_kernels_through_the_stages():
    torch.manual_seed(0)
    head = _semantic_head().eval()
    features = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        out = head(features)
        # independent composition: S0 = conv_seg(F) (no dropout in eval), K0 = conv_seg.weight
        w, b = head.conv_seg.weight, head.conv_seg.bias
        logits = torch.einsum("kc,bchw->bkhw", w.flatten(1), features) + b[None, :, None, None]
        kernels = w.flatten(1)[None].expand(2, -1, -1)
        for stage in head.stages:
            kernels, logits, cls = stage(features, kernels, logits)
            assert cls is None
    assert list(out) == ["stages"] and len(out["stages"]) == 1
    torch.testing.assert_close(out["stages"][0]["seg_logits"], logits)
    assert logits.shape == (2, 5, 9, 11)


def test_semantic_head_training_outputs_and_gradients():
    torch.manual_seed(0)
    head = _semantic_head().train()
    features = torch.randn(2, 32, 9, 11, requires_grad=True)
    out = head(features)
    assert out["init"]["seg_logits"].shape == (2, 5, 9, 11)
    assert len(out["stages"]) == 2
    out["stages"][-1]["seg_logits"].square().mean().backward()
    # conv_seg gets gradient through the kernels and the softmax group features
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert torch.count_nonzero(features.grad) > 0


def test_semantic_head_rejects_instance_stages():
    stage = KernelUpdateHead(
        num_classes=3, channels=16, num_heads=2, dim_feedforward=32, updator_channels=16
    )
    with pytest.raises(ValueError, match="semantic update stages"):
        KNetSemanticKernelHead(channels=16, num_classes=3, stages=[stage])


def test_semantic_stages_keep_pytorch_default_init():
    cfg, model = build()
    assert cfg.MODEL.KNET.XAVIER_INIT_STAGES is False
    stage = model.kernel_head.stages[0]
    # nn.Linear's default init is U(+-1/sqrt(fan_in)); Xavier would use sqrt(6/(fan_in+fan_out))
    bound = 1 / np.sqrt(stage.fc_mask.in_features)
    assert stage.fc_mask.weight.abs().max() <= bound
    assert not hasattr(stage, "fc_cls")


# ----------------------------------------------------------------------------- meta-arch
def test_model_parts(semantic_model):
    model = semantic_model
    assert isinstance(model, SemanticKNet) and model.auxiliary_head is not None
    assert isinstance(model.kernel_head, KNetSemanticKernelHead)
    assert isinstance(model.criterion, KNetSemanticCriterion)
    assert model.kernel_head.conv_seg.out_channels == NUM_CLASSES
    assert model.criterion.aux_weight == pytest.approx(0.4)
    assert len(model.kernel_head.stages) == 3


@pytest.mark.parametrize(
    "sizes", [[(64, 64), (64, 64)], [(61, 47), (53, 70), (37, 33)]], ids=["even", "odd"]
)
def test_training_losses_and_gradient_to_every_parameter(semantic_model, sizes):
    model = semantic_model.train()
    batch = [sample(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    model.zero_grad()
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {"loss_init_ce", "s0_loss_ce", "s1_loss_ce", "s2_loss_ce", "loss_aux_ce"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_all_ignore_labels_give_zero_losses(semantic_model):
    model = semantic_model.train()
    batch = [sample(48, 40, seed=3), sample(40, 48, seed=4)]
    for x in batch:
        x["sem_seg"][:] = 255
    with EventStorage():
        losses = model(batch)
    assert all(v.item() == 0.0 for v in losses.values())


def test_padding_is_ignored_in_the_targets(semantic_model):
    batch = [sample(40, 50, seed=5), sample(56, 30, seed=6)]
    labels = semantic_model.prepare_targets(batch, (64, 64))
    assert labels.shape == (2, 64, 64)
    assert torch.equal(labels[0, :40, :50], batch[0]["sem_seg"])
    assert (labels[0, 40:] == 255).all() and (labels[0, :, 50:] == 255).all()
    assert (labels[1, :, 30:] == 255).all() and (labels[1, 56:] == 255).all()


def test_bad_labels_are_reported(semantic_model):
    model = semantic_model.train()
    x = sample(32, 32)
    x["sem_seg"][0, 0] = NUM_CLASSES
    x["file_name"] = "bad.png"
    with pytest.raises(ValueError, match=r"bad\.png.*\[0, 7\).*NUM_CLASSES=7"):
        model([sample(32, 32), x])
    y = sample(32, 32)
    del y["sem_seg"]
    with pytest.raises(KeyError, match="sem_seg.*knet_semantic"):
        model([sample(32, 32), y])


def test_inference_outputs_probabilities_at_the_output_size(semantic_model):
    model = semantic_model.eval()
    inputs = [
        {"image": sample(45, 61, seed=1)["image"], "height": 90, "width": 122},
        {"image": sample(33, 29, seed=2)["image"]},
    ]
    with torch.no_grad():
        results = model(inputs)
    assert [list(r) for r in results] == [["sem_seg"], ["sem_seg"]]
    assert results[0]["sem_seg"].shape == (NUM_CLASSES, 90, 122)
    assert results[1]["sem_seg"].shape == (NUM_CLASSES, 33, 29)
    for r in results:
        assert r["sem_seg"].dtype == torch.float32
        torch.testing.assert_close(r["sem_seg"].sum(0), torch.ones(r["sem_seg"].shape[1:]))
    # alone, the second image is not padded to the first one's size; the padding of the batch
    # only changes its probabilities slightly (through the convolutions' receptive field)
    with torch.no_grad():
        alone = model([inputs[1]])[0]["sem_seg"]
    torch.testing.assert_close(alone, results[1]["sem_seg"], rtol=0, atol=0.2)


def test_inference_equals_resized_last_stage_logits(semantic_model):
    model = semantic_model.eval()
    image = sample(40, 52, seed=8)["image"]
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        logits = model.kernel_head(*model.pixel_decoder.forward_features(features))
        logits = logits["stages"][-1]["seg_logits"]
        # as the official whole-image test: resize to the input size, then to the output size
        expected = F.interpolate(logits, size=(40, 52), mode="bilinear", align_corners=False)
        expected = F.interpolate(expected, size=(80, 104), mode="bilinear", align_corners=False)
        result = model([{"image": image, "height": 80, "width": 104}])[0]["sem_seg"]
    assert images.tensor.shape[-2:] == (40, 52)  # SIZE_DIVISIBILITY 0: whole image, no padding
    torch.testing.assert_close(result, expected[0].softmax(0), rtol=1e-5, atol=1e-6)


def test_panoptic_flags_are_rejected_for_semantic_models():
    with pytest.raises(ValueError, match="only predicts sem_seg"):
        build(["MODEL.KNET.TEST.PANOPTIC_ON", "True"])


def test_auxiliary_head_is_rejected_for_panoptic_models():
    cfg = get_knet_cfg(
        str(ROOT / "configs/toy/knet_R18_toy_panoptic.yaml"),
        ["MODEL.KNET.AUX_HEAD.LOSS_WEIGHT", "0.4"],
    )
    with pytest.raises(ValueError, match="AUX_HEAD.LOSS_WEIGHT"):
        build_model(cfg)


@pytest.mark.slow
def test_short_training_run_reduces_loss():
    cfg, model = build(seed=1)
    model.train()
    batch = [sample(64, 64, seed=11, ignore_frac=0.0), sample(64, 64, seed=12, ignore_frac=0.0)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    history = []
    with EventStorage():
        for _ in range(25):
            total = sum(model(batch).values())
            optimizer.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            history.append(float(total))
    assert np.isfinite(history).all()
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5]), history
    model.eval()
    with torch.no_grad():
        pred = model([{"image": batch[0]["image"]}])[0]["sem_seg"].argmax(0)
    assert (pred == batch[0]["sem_seg"]).float().mean() > 0.8


# ----------------------------------------------------------------------------- TTA
class FakeSemanticModel(torch.nn.Module):
    """Probabilities read from the (augmented) image, resized to the requested output size:
    a flipped input gives a flipped output."""

    def forward(self, inputs):
        outs = []
        for x in inputs:
            p = x["image"][:1].float()[None] / 255
            p = F.interpolate(p, size=(x["height"], x["width"]), mode="bilinear")[0, 0]
            outs.append({"sem_seg": torch.stack([p, 1 - p])})
        return outs


def test_tta_flips_back_and_averages():
    cfg = get_knet_cfg(
        TOY_SEMANTIC,
        ["TEST.AUG.MIN_SIZES", "(16, 24, 32)", "TEST.AUG.MAX_SIZE", "100", "TEST.AUG.FLIP", "True"],
    )
    tta = SemanticSegmentorWithTTA(cfg, FakeSemanticModel())
    ramp = torch.linspace(0, 255, 30).round().to(torch.uint8)
    image = ramp[None, None].expand(3, 20, 30).contiguous()  # brightness grows left to right
    x = {"image": image, "height": 20, "width": 30}
    out = tta([x])[0]["sem_seg"]
    plain = FakeSemanticModel()([x])[0]["sem_seg"]
    assert len(tta.tta_mapper(x)) == 6  # 3 sizes x (as is, flipped)
    # flipped outputs are flipped back, so every augmentation agrees with the plain output
    # (up to the resizes); without the flip-back the average would be flat along x
    torch.testing.assert_close(out, plain, rtol=0, atol=0.03)
    assert out[0, :, -1].mean() - out[0, :, 0].mean() > 0.9
    assert out.shape == (2, 20, 30)


def test_tta_with_one_scale_and_no_flip_equals_plain_inference(semantic_model):
    cfg = get_knet_cfg(
        TOY_SEMANTIC,
        ["TEST.AUG.MIN_SIZES", "(36,)", "TEST.AUG.MAX_SIZE", "1000", "TEST.AUG.FLIP", "False"],
    )
    model = semantic_model.eval()
    x = {"image": sample(36, 50, seed=9)["image"], "height": 36, "width": 50}
    with torch.no_grad():
        expected = model([x])[0]["sem_seg"]
    out = SemanticSegmentorWithTTA(cfg, model)([x])[0]["sem_seg"]
    torch.testing.assert_close(out, expected)
