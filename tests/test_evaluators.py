"""Detectron2's evaluators on K-Net datasets: ground truth scores 100, and perturbed predictions
score exactly what independent implementations (numpy PQ / mIoU, hotcoco AP) compute."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import hotcoco
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator
from detectron2.structures import BitMasks, Instances
from panoptic_conversion import read_panoptic_png
from PIL import Image

import knet  # noqa: F401  (registers the datasets)

SHIFT = (3, -2)  # (rows, cols) roll applied to perturbed predictions


@pytest.fixture(scope="module")
def coco_sample(shared_data_root, prepared_coco_sample):
    return os.path.join(shared_data_root, "coco_panoptic_sample")


@pytest.fixture(scope="module")
def ade_sample(shared_data_root, prepared_ade20k_sample):
    return os.path.join(shared_data_root, "ade20k_sample")


# --------------------------------------------------------------------------- model-format outputs
def _inputs(rec):
    return {k: rec[k] for k in ("file_name", "image_id", "height", "width") if k in rec}


def _panoptic_output(rec, perturb):
    """(id map int32 tensor, segments_info); perturbed: rolled and the first thing dropped."""
    ids = read_panoptic_png(rec["pan_seg_file_name"])
    segs = [{k: s[k] for k in ("id", "category_id", "isthing")} for s in rec["segments_info"]]
    if perturb:
        ids = np.roll(ids, SHIFT, axis=(0, 1))
        drop = next((s for s in segs if s["isthing"]), segs[0])
        ids[ids == drop["id"]] = 0
        segs = [s for s in segs if s is not drop]
    return {"panoptic_seg": (torch.from_numpy(ids.astype(np.int32)), segs)}


def _instances_output(rec, perturb, rng):
    ids = read_panoptic_png(rec["pan_seg_file_name"])
    segs = [s for s in rec["segments_info"] if s["isthing"] and not s["iscrowd"]]
    masks = [ids == s["id"] for s in segs]
    classes = [s["category_id"] for s in segs]
    scores = [1.0] * len(segs)
    if perturb and segs:
        masks = [np.roll(m, SHIFT, axis=(0, 1)) for m in masks[1:]]
        classes = classes[1:]
        scores = rng.uniform(0.05, 1.0, len(classes)).tolist()  # distinct: no ranking ties
    h, w = ids.shape
    inst = Instances((h, w))
    pred = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.bool)
    inst.pred_masks = pred
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_boxes = BitMasks(pred).get_bounding_boxes()
    return {"instances": inst}


def _sem_seg_labels(rec, num_classes, perturb):
    """Predicted (H, W) labels: GT with void -> 0; perturbed: rolled, first class relabelled."""
    gt = np.asarray(Image.open(rec["sem_seg_file_name"])).astype(np.int64)
    pred = np.where(gt == 255, 0, gt)
    if perturb:
        pred = np.roll(pred, SHIFT, axis=(0, 1))
        c = int(np.unique(gt[gt != 255])[0])
        pred[pred == c] = (c + 1) % num_classes
    return pred


def _sem_seg_output(labels, num_classes):
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels), num_classes)
    return {"sem_seg": onehot.permute(2, 0, 1).float()}


def _run(evaluator, records, make_output):
    evaluator.reset()
    for rec in records:
        evaluator.process([_inputs(rec)], [make_output(rec)])
    return evaluator.evaluate()


# --------------------------------------------------------------------------- independent metrics
def _numpy_pq(gt_json, gt_dir, preds, categories):
    """PQ with panopticapi's rules, from scratch: match IoU > 0.5 within a category, subtract the
    prediction's overlap with void from the union, ignore crowd GT and predictions lying mostly
    on void / same-class crowd. ``preds``: image_id -> (id map, [{"id", "category_id"}]) with
    dataset category ids. Returns {"PQ", "PQ_th", "PQ_st"} in percent."""
    stats = defaultdict(lambda: np.zeros(4))  # iou_sum, tp, fp, fn
    for ann in gt_json["annotations"]:
        gt_ids = read_panoptic_png(os.path.join(gt_dir, ann["file_name"])).astype(np.int64)
        pred_ids, pred_segs = preds[ann["image_id"]]
        pred_ids = pred_ids.astype(np.int64)
        gt_cat = {s["id"]: s["category_id"] for s in ann["segments_info"]}
        gt_crowd = {s["id"] for s in ann["segments_info"] if s["iscrowd"]}
        pred_cat = {s["id"]: s["category_id"] for s in pred_segs}
        gt_area = {i: int((gt_ids == i).sum()) for i in gt_cat}
        pred_area = {i: int((pred_ids == i).sum()) for i in pred_cat}
        codes, counts = np.unique(gt_ids * 2**24 + pred_ids, return_counts=True)
        inter = {(int(c) >> 24, int(c) & (2**24 - 1)): int(n) for c, n in zip(codes, counts)}
        matched_g, matched_p = set(), set()
        for (g, p), n in inter.items():
            if g in gt_crowd or g not in gt_cat or p not in pred_cat or gt_cat[g] != pred_cat[p]:
                continue
            union = gt_area[g] + pred_area[p] - n - inter.get((0, p), 0)
            if n / union > 0.5:
                matched_g.add(g)
                matched_p.add(p)
                stats[gt_cat[g]] += [n / union, 1, 0, 0]
        crowd_of_cat = {gt_cat[g]: g for g in gt_cat if g in gt_crowd}  # last crowd per class
        for g in gt_cat:
            if g not in matched_g and g not in gt_crowd:
                stats[gt_cat[g]][3] += 1
        for p, c in pred_cat.items():
            if p in matched_p:
                continue
            ignored = inter.get((0, p), 0) + inter.get((crowd_of_cat.get(c, -1), p), 0)
            if ignored / pred_area[p] <= 0.5:
                stats[c][2] += 1

    def average(isthing):
        values = []
        for c in categories:
            if isthing is not None and bool(c["isthing"]) != isthing:
                continue
            iou, tp, fp, fn = stats[c["id"]]
            if tp + fp + fn > 0:
                values.append(iou / (tp + 0.5 * fp + 0.5 * fn))
        return 100 * float(np.mean(values))

    return {"PQ": average(None), "PQ_th": average(True), "PQ_st": average(False)}


def _numpy_miou(records, predictions, num_classes):
    """Mean over classes present in GT or prediction of TP / (GT + pred - TP), void ignored."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for rec in records:
        gt = np.asarray(Image.open(rec["sem_seg_file_name"])).astype(np.int64)
        valid = gt != 255
        pairs = gt[valid] * num_classes + predictions[rec["file_name"]][valid]
        conf += np.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    return 100 * float(np.mean(tp[union > 0] / union[union > 0]))


def _hotcoco_mask_ap(gt_json_file, results_file, img_ids):
    gt = hotcoco.COCO(gt_json_file)
    with open(results_file) as f:
        results = json.load(f)
    ev = hotcoco.COCOeval(gt, gt.loadRes(results), "segm")
    ev.params.imgIds = sorted(img_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return 100 * float(ev.stats[0])


# --------------------------------------------------------------------------- the checks
def _check_panoptic(name, records, tmp_path):
    meta = MetadataCatalog.get(name)
    perfect = _run(
        COCOPanopticEvaluator(name, output_dir=str(tmp_path / "pq")),
        records,
        lambda r: _panoptic_output(r, False),
    )["panoptic_seg"]
    assert perfect["PQ"] == pytest.approx(100.0) and perfect["SQ"] == pytest.approx(100.0)
    assert perfect["PQ_th"] == pytest.approx(100.0) and perfect["PQ_st"] == pytest.approx(100.0)

    perturbed = _run(
        COCOPanopticEvaluator(name, output_dir=str(tmp_path / "pq2")),
        records,
        lambda r: _panoptic_output(r, True),
    )["panoptic_seg"]
    with open(meta.panoptic_json) as f:
        gt_json = json.load(f)
    contig_to_dataset = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
    preds = {}
    for rec in records:
        ids, segs = _panoptic_output(rec, True)["panoptic_seg"]
        segs = [{"id": s["id"], "category_id": contig_to_dataset[s["category_id"]]} for s in segs]
        preds[rec["image_id"]] = (ids.numpy(), segs)
    expected = _numpy_pq(gt_json, meta.panoptic_root, preds, gt_json["categories"])
    assert perturbed["PQ"] < 95.0
    for key in ("PQ", "PQ_th", "PQ_st"):
        assert perturbed[key] == pytest.approx(expected[key], rel=1e-6), key


def _check_mask_ap(name, records, tmp_path):
    meta = MetadataCatalog.get(name)
    ev = COCOEvaluator(name, tasks=("segm",), use_fast_impl=False, output_dir=str(tmp_path / "ap"))
    rng = np.random.default_rng(0)
    perfect = _run(ev, records, lambda r: _instances_output(r, False, rng))["segm"]
    assert perfect["AP"] == pytest.approx(100.0) and perfect["AP50"] == pytest.approx(100.0)

    out_dir = tmp_path / "ap2"
    ev = COCOEvaluator(name, tasks=("segm",), use_fast_impl=False, output_dir=str(out_dir))
    perturbed = _run(ev, records, lambda r: _instances_output(r, True, rng))["segm"]
    expected = _hotcoco_mask_ap(
        meta.json_file,
        str(out_dir / "coco_instances_results.json"),
        [r["image_id"] for r in records],
    )
    assert perturbed["AP"] < 90.0
    assert round(perturbed["AP"], 4) == round(expected, 4)


def _check_sem_seg(name, records, tmp_path):
    k = len(MetadataCatalog.get(name).stuff_classes)
    perfect = _run(
        SemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "ss")),
        records,
        lambda r: _sem_seg_output(_sem_seg_labels(r, k, False), k),
    )["sem_seg"]
    assert perfect["mIoU"] == pytest.approx(100.0) and perfect["pACC"] == pytest.approx(100.0)

    labels = {r["file_name"]: _sem_seg_labels(r, k, True) for r in records}
    perturbed = _run(
        SemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "ss2")),
        records,
        lambda r: _sem_seg_output(labels[r["file_name"]], k),
    )["sem_seg"]
    assert perturbed["mIoU"] < 95.0
    assert perturbed["mIoU"] == pytest.approx(_numpy_miou(records, labels, k), rel=1e-9)


TOY = "knet_toy_val_panoptic_with_sem_seg"
COCO = "coco_sample_val_panoptic_with_sem_seg"


def test_toy_panoptic_quality(toy_root, tmp_path):
    _check_panoptic(TOY, DatasetCatalog.get(TOY), tmp_path)


def test_toy_mask_ap(toy_root, tmp_path):
    # pycocotools evaluates every GT image, so predictions cover the whole val split
    _check_mask_ap(TOY, DatasetCatalog.get(TOY), tmp_path)


def test_toy_mask_ap_instance_dataset(toy_root, tmp_path):
    name = "knet_toy_val"
    ev = COCOEvaluator(name, tasks=("segm",), use_fast_impl=False, output_dir=str(tmp_path))
    rng = np.random.default_rng(0)
    result = _run(ev, DatasetCatalog.get(TOY), lambda r: _instances_output(r, False, rng))
    assert result["segm"]["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize("name", [TOY, "knet_toy_sem_seg_val"])
def test_toy_miou(toy_root, tmp_path, name):
    _check_sem_seg(name, DatasetCatalog.get(name), tmp_path)


def test_coco_sample_panoptic_quality(coco_sample, tmp_path):
    _check_panoptic(COCO, DatasetCatalog.get(COCO), tmp_path)


def test_coco_sample_mask_ap(coco_sample, tmp_path):
    _check_mask_ap(COCO, DatasetCatalog.get(COCO), tmp_path)


def test_coco_sample_miou(coco_sample, tmp_path):
    _check_sem_seg(COCO, DatasetCatalog.get(COCO), tmp_path)


def test_ade20k_sample_miou(ade_sample, tmp_path):
    for split in ("train", "val"):
        name = f"ade20k_sample_sem_seg_{split}"
        _check_sem_seg(name, DatasetCatalog.get(name), tmp_path / split)
