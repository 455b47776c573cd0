"""Your own data: datasets written by the test in the three formats are registered from the
command line, their class counts and outputs configure the model, wrong counts fail early and
clearly, training and evaluation run, and the demo draws the class names. A run describes its
model: later processes that register nothing (DefaultPredictor, the demo, the export tool, the
exported file) draw the class names from the run's folder."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
import yaml
from custom_data import (
    PANOPTIC_CATEGORIES,
    SEMANTIC_CLASSES,
    make_coco_instances,
    make_coco_panoptic,
    make_sem_seg,
)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.utils.visualizer import Visualizer
from scripts import load_script

import knet  # noqa: F401  (registers the model)
from knet.checkpoint import KNetCheckpointer
from knet.config import load_knet_config
from knet.data import DatasetClassError, DatasetNotRegisteredError
from knet.data.datasets import register_custom_dataset
from knet.data.kinds import dataset_classes, model_metadata
from knet.engine import KNetTrainer, get_knet_cfg
from knet.engine.arguments import (
    DatasetArgumentError,
    parse_dataset_args,
    register_dataset_specs,
)
from knet.engine.dataset_config import configure_for_datasets
from knet.export import ExportedKNet

REPO = Path(__file__).resolve().parents[1]
CUSTOM = REPO / "configs" / "custom"
INSTANCE_CPU = str(CUSTOM / "knet_R18_cpu_instance.yaml")
PANOPTIC_CPU = str(CUSTOM / "knet_R18_cpu_panoptic.yaml")
SEMANTIC_CPU = str(CUSTOM / "knet_upernet_R18_cpu_semantic.yaml")
COCO_INSTANCE = str(REPO / "configs/coco/instance-segmentation/knet_R50_bs16_1x.yaml")
SHORT_RUN = [
    "MODEL.KNET.NUM_STAGES", "1",
    "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]",
    "INPUT.MIN_SIZE_TRAIN", "(64, 72)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.EVAL_PERIOD", "0",
]  # fmt: skip
TINY = ["MODEL.KNET.NUM_PROPOSALS", "4", *SHORT_RUN]
TINY_SEMANTIC = ["INPUT.CROP.SIZE", "(64, 64)", *SHORT_RUN]
DROP_BACKGROUND = ["DATASETS.DROP_CATEGORIES", "['_background_']"]


@pytest.fixture
def knet_log(caplog):
    """caplog that also sees the "knet" loggers when a demo run stopped their propagation."""
    logger = logging.getLogger("knet")
    attach = not logger.propagate
    if attach:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The three datasets, train (4 images) and val (2 images) splits each."""
    root = tmp_path_factory.mktemp("own_data")
    return {
        "instances": {
            split: make_coco_instances(root / "coco", split, idx, background=True)
            for split, idx in (("train", [0, 1, 2, 3]), ("val", [4, 5]))
        },
        "panoptic": {
            split: make_coco_panoptic(root / "panoptic", split, idx)
            for split, idx in (("train", [0, 1, 2, 3]), ("val", [4, 5]))
        },
        "semantic": {
            split: make_sem_seg(root / "semantic", split, idx)
            for split, idx in (("train", [0, 1, 2, 3]), ("val", [4, 5]))
        },
    }


def dataset_args(data, kind: str, prefix: str = "my_dataset") -> list:
    """The --dataset options registering ``{prefix}_train`` and ``{prefix}_val``."""
    args = []
    for split in ("train", "val"):
        paths = data[kind][split]
        if kind == "instances":
            args += ["--dataset", f"{prefix}_{split}", "coco-instances", *paths]
        elif kind == "panoptic":
            args += ["--dataset", f"{prefix}_{split}", "coco-panoptic", *paths]
        else:
            images, labels, classes = paths
            args += ["--dataset", f"{prefix}_{split}", "sem-seg", images, labels]
            args += ["--classes", classes]
    return args


def register(data, kind: str, prefix: str, drop=()) -> None:
    _, specs = parse_dataset_args(dataset_args(data, kind, prefix))
    for spec in specs:
        spec.register(drop)


def configured(config: str, prefix: str, opts=(), mode="train"):
    """``config`` with DATASETS naming ``{prefix}_{train,val}``, configured like train_net."""
    opts = ["DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", f"('{prefix}_val',)", *opts]
    cfg, explicit_keys = load_knet_config(config, opts)
    line = configure_for_datasets(cfg, explicit_keys, mode)
    return cfg, line


# ----------------------------------------------------------------------------- command line
def test_dataset_groups_are_taken_out_of_the_command_line():
    argv = [
        "--config-file", "x.yaml",
        "--dataset", "a_train", "coco-instances", "a.json", "imgs/",
        "--eval-only",
        "--dataset", "b_val", "sem-seg", "im/", "lab/", "--classes", "c.txt", "--ignore-label", "0",
        "SOLVER.MAX_ITER", "3",
        "--dataset", "c", "coco-panoptic", "p.json", "png/", "im/",
        "OUTPUT_DIR", "out",
    ]  # fmt: skip
    rest, specs = parse_dataset_args(argv)
    assert rest == ["--config-file", "x.yaml", "--eval-only", "SOLVER.MAX_ITER", "3"] + [
        "OUTPUT_DIR",
        "out",
    ]
    assert [(s.name, s.format, s.paths) for s in specs] == [
        ("a_train", "coco-instances", ("a.json", "imgs/")),
        ("b_val", "sem-seg", ("im/", "lab/")),
        ("c", "coco-panoptic", ("p.json", "png/", "im/")),
    ]
    assert dict(specs[1].options) == {"classes": "c.txt", "ignore_label": 0}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "a", "coco"], "unknown format 'coco'"),
        (["--dataset", "a", "coco-instances", "a.json"], "JSON IMAGE_ROOT"),
        (["--dataset", "a", "sem-seg", "im/", "lab/"], "needs --classes"),
        (["--dataset", "a", "sem-seg", "i/", "l/", "--classes", "c", "--ignore-label", "x"], "int"),
        (["--classes", "c.txt"], "belongs to a dataset"),
        (["--dataset", "a", "coco-instances", "a", "b"] * 2, "given twice"),
    ],
)  # fmt: skip
def test_malformed_dataset_groups(argv, message):
    with pytest.raises(DatasetArgumentError, match=message):
        parse_dataset_args(argv)


# ----------------------------------------------------------------------------- registration
def test_instances_registration_and_background_category(data, knet_log):
    register(data, "instances", "inst_bg")
    assert "'_background_' (id 0)" in knet_log.text
    assert "DATASETS.DROP_EMPTY_CATEGORIES True" in knet_log.text
    meta = MetadataCatalog.get("inst_bg_train")
    assert meta.evaluator_type == "coco" and meta.json_file == data["instances"]["train"][0]
    assert meta.thing_classes == ["_background_", "cat", "dog"]
    assert meta.thing_dataset_id_to_contiguous_id == {0: 0, 3: 1, 7: 2}
    assert len(meta.thing_colors) == 3 and all(len(c) == 3 for c in meta.thing_colors)
    # Detectron2's loader sets the same class metadata when it loads the records
    records = DatasetCatalog.get("inst_bg_train")
    assert {a["category_id"] for r in records for a in r["annotations"]} == {1, 2}

    register(data, "instances", "inst", drop=["_background_"])
    meta = MetadataCatalog.get("inst_train")
    assert meta.thing_classes == ["cat", "dog"] and meta.thing_dataset_id_to_contiguous_id == {
        3: 0,
        7: 1,
    }
    assert not hasattr(meta, "json_file")  # COCOEvaluator converts the records instead
    records = DatasetCatalog.get("inst_train")
    assert len(records) == 4 and {a["category_id"] for r in records for a in r["annotations"]} == {
        0,
        1,
    }
    with pytest.raises(ValueError, match="cannot drop category 'cat'"):
        register_custom_dataset("inst_drop_cat", "coco-instances", *data["instances"]["val"],
                                drop_categories=["cat"])  # fmt: skip
    # the same registration again is a no-op; another one under a taken name is an error
    register_custom_dataset("inst_train", "coco-instances", *data["instances"]["train"],
                            drop_categories=["_background_"])  # fmt: skip
    with pytest.raises(ValueError, match="already registered"):
        register_custom_dataset("inst_train", "coco-instances", *data["instances"]["val"])


def test_drop_empty_categories_leaves_out_those_of_the_training_data_and_lists_them(data):
    register(data, "instances", "listed", drop=["_background_"])
    splits = ["DATASETS.TRAIN", "('empty_train',)", "DATASETS.TEST", "('empty_val',)"]
    cfg, explicit = load_knet_config(
        INSTANCE_CPU, [*splits, "DATASETS.DROP_EMPTY_CATEGORIES", "True"]
    )
    _, specs = parse_dataset_args(dataset_args(data, "instances", "empty"))
    register_dataset_specs(specs[::-1], cfg)  # the training dataset is registered first
    assert cfg.DATASETS.DROP_CATEGORIES == ["_background_"]  # what config.yaml then records
    for split in ("train", "val"):
        got, listed = MetadataCatalog.get(f"empty_{split}"), MetadataCatalog.get(f"listed_{split}")
        assert got.thing_classes == listed.thing_classes == ["cat", "dog"]
        assert got.thing_dataset_id_to_contiguous_id == listed.thing_dataset_id_to_contiguous_id
    configure_for_datasets(cfg, explicit)
    assert cfg.MODEL.KNET.CLASS_NAMES == ["cat", "dog"] and len(cfg.MODEL.KNET.CLASS_COLORS) == 2
    assert model_metadata(cfg) is MetadataCatalog.get("empty_val")  # registered metadata wins
    # without registered datasets the names come from the config, as the datasets hold them
    unregistered = ["DATASETS.TRAIN", "('nowhere',)", "DATASETS.TEST", "()"]
    cfg.merge_from_list(unregistered)
    assert model_metadata(cfg).thing_classes == ["cat", "dog"]
    names = ["MODEL.KNET.CLASS_NAMES", "['cat', 'dog', 'sky', 'grass']", *unregistered]
    meta = model_metadata(
        get_knet_cfg(
            PANOPTIC_CPU,
            [*names, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4", "MODEL.KNET.NUM_THING_CLASSES", "2"],
        )
    )
    assert meta.thing_classes == ["cat", "dog"] and meta.stuff_classes[2:] == ["sky", "grass"]
    meta = model_metadata(
        get_knet_cfg(SEMANTIC_CPU, [*names, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4"])
    )
    assert meta.stuff_classes == ["cat", "dog", "sky", "grass"] and not hasattr(
        meta, "thing_classes"
    )
    with pytest.raises(DatasetClassError, match="CLASS_NAMES has 4 names.*model has 3 classes"):
        model_metadata(get_knet_cfg(SEMANTIC_CPU, [*names, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3"]))


def test_panoptic_registration_puts_things_first(data):
    register(data, "panoptic", "pan")
    meta = MetadataCatalog.get("pan_train")
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert (meta.ignore_label, meta.label_divisor) == (255, 1000)
    assert meta.panoptic_json == data["panoptic"]["train"][0]
    assert meta.panoptic_root == data["panoptic"]["train"][1]
    assert meta.thing_classes == ["cat", "dog"]
    assert meta.stuff_classes == ["cat", "dog", "sky", "grass"]  # all classes, things first
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    assert meta.stuff_dataset_id_to_contiguous_id == {3: 0, 7: 1, 10: 2, 20: 3}
    assert len(meta.stuff_colors) == len(PANOPTIC_CATEGORIES)
    record = DatasetCatalog.get("pan_train")[1]
    assert record["file_name"].endswith("images/img_001.jpg") and record["height"] == 64
    assert record["pan_seg_file_name"].endswith("panoptic_train/img_001.png")
    cats = {(s["category_id"], s["isthing"]) for s in record["segments_info"]}
    assert cats == {(0, True), (1, True), (2, False), (3, False)}
    info = dataset_classes("pan_train")
    assert (info.kind, info.num_classes, info.num_thing_classes) == ("panoptic", 4, 2)


def test_sem_seg_registration(data, knet_log):
    images, labels, classes = data["semantic"]["train"]
    meta = register_custom_dataset("sem_254", "sem-seg", images, labels, classes=classes,
                                   ignore_label=254)  # fmt: skip
    assert "skipped the first line '__ignore__'" in knet_log.text
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 254
    assert meta.stuff_classes == SEMANTIC_CLASSES and len(meta.stuff_colors) == 4
    assert (meta.image_root, meta.sem_seg_root) == (images, labels)
    records = DatasetCatalog.get("sem_254")
    assert len(records) == 4
    assert all(Path(r["file_name"]).stem == Path(r["sem_seg_file_name"]).stem for r in records)
    with pytest.raises(FileNotFoundError, match="Class list not found"):
        register_custom_dataset("sem_x", "sem-seg", images, labels, classes="missing.txt")
    with pytest.raises(ValueError, match="needs its class names"):
        register_custom_dataset("sem_y", "sem-seg", images, labels)


# ----------------------------------------------------------------------------- class counts
def test_class_counts_and_outputs_come_from_the_dataset(data, knet_log):
    register(data, "instances", "auto_inst", drop=["_background_"])
    cfg, line = configured(INSTANCE_CPU, "auto_inst")
    assert (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.KNET.NUM_THING_CLASSES) == (2, 2)
    test = cfg.MODEL.KNET.TEST
    assert (test.PANOPTIC_ON, test.INSTANCE_ON, test.SEMANTIC_ON) == (False, True, False)
    assert "'auto_inst_train'" in line and "NUM_CLASSES 2" in line and "outputs instances" in line
    assert line in knet_log.text  # logged, one line

    register(data, "panoptic", "auto_pan")
    cfg, line = configured(PANOPTIC_CPU, "auto_pan")
    assert (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.KNET.NUM_THING_CLASSES) == (4, 2)
    test = cfg.MODEL.KNET.TEST  # no instances json / semantic labels: PQ only
    assert (test.PANOPTIC_ON, test.INSTANCE_ON, test.SEMANTIC_ON) == (True, False, False)

    images, labels, classes = data["semantic"]["train"]
    for split in ("train", "val"):
        register_custom_dataset(f"auto_sem_{split}", "sem-seg", *data["semantic"][split][:2],
                                classes=classes, ignore_label=254)  # fmt: skip
    cfg, line = configured(SEMANTIC_CPU, "auto_sem")
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 4 and cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 254
    assert "IGNORE_VALUE 254" in line
    # -1 takes the number from the dataset even where a base config sets it (COCO: 80)
    cfg, _ = configured(
        COCO_INSTANCE,
        "auto_inst",
        ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "-1", "MODEL.KNET.NUM_THING_CLASSES", "-1"],
    )
    assert (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.KNET.NUM_THING_CLASSES) == (2, 2)
    # what train_net writes to OUTPUT_DIR/config.yaml is the resolved config
    assert "NUM_CLASSES: 2" in cfg.dump()


def test_explicit_class_counts_are_checked_against_every_dataset(data):
    register(data, "instances", "exp", drop=["_background_"])
    with pytest.raises(DatasetClassError) as e:
        configured(COCO_INSTANCE, "exp")  # the COCO config sets 80 classes
    message = str(e.value)
    assert "MODEL.SEM_SEG_HEAD.NUM_CLASSES is 80" in message
    assert "dataset 'exp_train' has 2 classes" in message and "cat, dog" in message
    with pytest.raises(DatasetClassError, match=r"NUM_THING_CLASSES is 3, but dataset 'exp_train'"):
        configured(INSTANCE_CPU, "exp", ["MODEL.KNET.NUM_THING_CLASSES", "3"])
    # a test dataset with other classes (here: the background kept) is caught too
    register_custom_dataset("exp_bg_val", "coco-instances", *data["instances"]["train"])
    opts = ["DATASETS.TEST", "('exp_bg_val',)"]
    with pytest.raises(DatasetClassError, match="dataset 'exp_bg_val' has 3 classes"):
        configured(INSTANCE_CPU, "exp", opts)
    cfg, _ = configured(INSTANCE_CPU, "exp", ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2"])
    assert cfg.MODEL.KNET.NUM_THING_CLASSES == 2


def test_config_must_suit_the_kind_of_data(data):
    register(data, "instances", "kind", drop=["_background_"])
    with pytest.raises(DatasetClassError, match="needs 'knet_instance'"):
        configured(INSTANCE_CPU, "kind", ["INPUT.DATASET_MAPPER_NAME", "knet_panoptic"])
    with pytest.raises(DatasetClassError, match="PANOPTIC_ON is True.*no stuff classes"):
        configured(INSTANCE_CPU, "kind", ["MODEL.KNET.TEST.PANOPTIC_ON", "True"])
    with pytest.raises(DatasetClassError, match="KNetSemanticKernelHead"):
        configured(SEMANTIC_CPU, "kind")
    with pytest.raises(DatasetNotRegisteredError, match="--dataset nowhere_train coco-instances"):
        configured(INSTANCE_CPU, "nowhere")
    # the demo skips datasets that are not registered; class counts left to the data then need
    # the data (or numbers), never a silent default
    with pytest.raises(DatasetClassError, match=r"NUM_CLASSES is -1.*register it \(--dataset\)"):
        configured(INSTANCE_CPU, "nowhere", mode="inference")
    opts = ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3", "MODEL.KNET.NUM_THING_CLASSES", "3"]
    cfg, line = configured(INSTANCE_CPU, "nowhere", opts, mode="inference")
    assert line is None and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3


def test_trainer_checks_class_counts_before_building_anything(data, tmp_path):
    register(data, "instances", "trainer", drop=["_background_"])
    opts = ["DATASETS.TRAIN", "('trainer_train',)", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu",
            "OUTPUT_DIR", str(tmp_path), *TINY]  # fmt: skip
    cfg = get_knet_cfg(INSTANCE_CPU, opts + ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"])
    with pytest.raises(DatasetClassError, match="NUM_CLASSES is 5, but dataset 'trainer_train'"):
        KNetTrainer(cfg)
    cfg = get_knet_cfg(INSTANCE_CPU, opts + ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "-1",
                                             "MODEL.KNET.NUM_THING_CLASSES", "-1",
                                             "MODEL.KNET.TEST.PANOPTIC_ON", "False"])  # fmt: skip
    trainer = KNetTrainer(cfg)
    assert trainer.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 2
    assert trainer.model.kernel_head.stages[0].fc_cls.out_features == 2


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize(
    "weights, expected",
    [
        ("pretrained/R-50-V1c.pkl", ["resnet50_v1c-2cccc1ad.pth",
                                     "tools/convert_pretrained_backbone.py"]),
        ("pretrained/knet_s3_r50_fpn_1x_coco_20211016_113017-8a8645d4.pth",
         ["download.openmmlab.com/mim-example/knet", "tools/convert_official_knet.py"]),
        ("missing/model.pth", ["README.md", "tools/convert_official_knet.py",
                               "tools/convert_pretrained_backbone.py"]),
        ("http://127.0.0.1:9/unreachable.pth", ["cannot be downloaded",
                                                "pretrained/unreachable.pth"]),
    ],
)  # fmt: skip
def test_missing_weights_name_where_they_come_from(weights, expected, monkeypatch, tmp_path):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))  # downloads (there are none) go here
    counts = ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "133", "MODEL.KNET.NUM_THING_CLASSES", "80"]
    cfg = get_knet_cfg(
        INSTANCE_CPU, ["MODEL.WEIGHTS", weights, "MODEL.KNET.NUM_PROPOSALS", "4"] + counts
    )
    with pytest.raises(FileNotFoundError) as e:
        DefaultPredictor(cfg)
    assert all(text in str(e.value) for text in expected), str(e.value)
    model = build_model(cfg)  # train_net's path: the trainer's / --eval-only checkpointer
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS"):
        KNetCheckpointer(model, save_dir=str(tmp_path / "run")).resume_or_load(weights, resume=True)


def test_fine_tuning_reports_the_class_specific_layers_in_one_line(tmp_path, knet_log):
    base = ["MODEL.KNET.NUM_PROPOSALS", "4", "MODEL.KNET.TEST.PANOPTIC_ON", "False"]
    source = build_model(get_knet_cfg(INSTANCE_CPU, base + ["MODEL.SEM_SEG_HEAD.NUM_CLASSES",
                                                            "80", "MODEL.KNET.NUM_THING_CLASSES",
                                                            "80"]))  # fmt: skip
    weights = tmp_path / "coco_like.pth"
    torch.save({"model": source.state_dict()}, weights)
    opts = base + ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3", "MODEL.KNET.NUM_THING_CLASSES", "3"]
    model = build_model(get_knet_cfg(INSTANCE_CPU, opts)).train()
    knet_log.clear()
    KNetCheckpointer(model).load(str(weights))
    warnings = [r for r in knet_log.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "with another shape" in message and "fc_cls" in message and "conv_seg" in message
    assert torch.equal(
        model.backbone.bottom_up.stem.conv1.weight, source.backbone.bottom_up.stem.conv1.weight
    )


# ----------------------------------------------------------------------------- end to end
def run_train_net(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train_net.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def run_demo(monkeypatch, argv) -> list:
    """Run demo/demo.py in this process; returns the texts its Visualizer drew."""
    monkeypatch.syspath_prepend(str(REPO / "demo"))
    demo = load_script("demo/demo.py")
    drawn = []
    draw_text = Visualizer.draw_text

    def record(self, text, *args, **kwargs):
        drawn.append(text)
        return draw_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Visualizer, "draw_text", record)
    demo.main(argv)
    return drawn


def train_evaluate_and_demo(
    tmp_path, monkeypatch, data, kind, config, prefix, opts, metric, demo_opts=()
):
    out = tmp_path / "run"
    datasets = dataset_args(data, kind, prefix)
    opts = [*opts, "DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", f"('{prefix}_val',)"]
    result = run_train_net("--config-file", config, *datasets, *opts, "OUTPUT_DIR", str(out))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert any(metric in m for m in metrics), metrics[-1]
    saved = (out / "config.yaml").read_text()

    vis = tmp_path / "vis.jpg"
    image = data[kind]["val"][-1 if kind != "semantic" else 0]
    image = sorted(Path(image).glob("img_004.*"))[0]
    drawn = run_demo(
        monkeypatch,
        [
            "--config-file", config, *datasets[len(datasets) // 2 :],  # the val dataset only
            "--input", str(image), "--output", str(vis), "--confidence-threshold", "0",
            "--opts", "MODEL.WEIGHTS", str(out / "model_final.pth"), *opts, *demo_opts,
        ],
    )  # fmt: skip
    assert vis.is_file()
    return log, saved, drawn


@pytest.mark.slow
def test_instance_data_trains_evaluates_and_the_demo_names_classes(tmp_path, monkeypatch, data):
    log, saved, drawn = train_evaluate_and_demo(
        tmp_path, monkeypatch, data, "instances", INSTANCE_CPU, "e2e_inst",
        TINY + DROP_BACKGROUND, "segm/AP",
    )  # fmt: skip
    assert "Dataset 'e2e_inst_train' (instance, 2 classes: cat, dog)" in log
    assert "NUM_CLASSES: 2" in saved and "NUM_THING_CLASSES: 2" in saved
    assert drawn and all(text.split()[0] in ("cat", "dog") for text in drawn), drawn


@pytest.mark.slow
def test_panoptic_data_trains_evaluates_and_the_demo_names_classes(tmp_path, monkeypatch, data):
    # 3 iterations leave no panoptic segment above the thresholds: the demo draws the semantic
    # output (all class names) and the instances (thing names) of the panoptic model instead
    outputs = ["MODEL.KNET.TEST.PANOPTIC_ON", "False", "MODEL.KNET.TEST.INSTANCE_ON", "True",
               "MODEL.KNET.TEST.SEMANTIC_ON", "True"]  # fmt: skip
    log, saved, drawn = train_evaluate_and_demo(
        tmp_path, monkeypatch, data, "panoptic", PANOPTIC_CPU, "e2e_pan", TINY, "panoptic_seg/PQ",
        outputs,
    )  # fmt: skip
    assert "NUM_CLASSES 4, NUM_THING_CLASSES 2 from the dataset" in log
    assert "NUM_CLASSES: 4" in saved and "NUM_THING_CLASSES: 2" in saved
    names = {c["name"] for c in PANOPTIC_CATEGORIES}
    assert drawn and all(text.split()[0] in names for text in drawn), drawn
    assert any(text.split()[0] in ("cat", "dog") and "%" in text for text in drawn), drawn


@pytest.mark.slow
def test_semantic_data_trains_evaluates_and_the_demo_names_classes(tmp_path, monkeypatch, data):
    log, saved, drawn = train_evaluate_and_demo(
        tmp_path, monkeypatch, data, "semantic", SEMANTIC_CPU, "e2e_sem", TINY_SEMANTIC,
        "sem_seg/mIoU",
    )  # fmt: skip
    assert "semantic, 4 classes: _background_, sky, grass, cat" in log
    assert "NUM_CLASSES: 4" in saved
    assert drawn and set(drawn) <= set(SEMANTIC_CLASSES), drawn


@pytest.mark.slow
def test_wrong_class_count_fails_before_training(tmp_path, data):
    result = run_train_net(
        "--config-file", INSTANCE_CPU, *dataset_args(data, "instances"), *TINY, *DROP_BACKGROUND,
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5", "OUTPUT_DIR", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode != 0
    assert "error: MODEL.SEM_SEG_HEAD.NUM_CLASSES is 5, but dataset 'my_dataset_train' has 2 " in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and "Starting training" not in result.stdout


def test_sem_seg_list_registration(data, tmp_path):
    images, labels, classes = data["semantic"]["train"]
    register_custom_dataset("sem_pairs", "sem-seg", images, labels, classes=classes)
    pairs = [
        (Path(r["file_name"]).resolve(), Path(r["sem_seg_file_name"]).resolve())
        for r in DatasetCatalog.get("sem_pairs")
    ]
    listed = Path(images).resolve().parent / "list.txt"  # paths relative to its folder
    lines = [" ".join(str(p.relative_to(listed.parent)) for p in pair) for pair in pairs]
    listed.write_text("\n".join(lines) + "\n\n")
    argv = ["--dataset", "sem_list", "sem-seg-list", str(listed), "--classes", classes]
    _, specs = parse_dataset_args(argv + ["--ignore-label", "254"])
    specs[0].register()
    meta = MetadataCatalog.get("sem_list")
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 254
    assert meta.stuff_classes == SEMANTIC_CLASSES
    assert dataset_classes("sem_list").kind == "semantic"
    records = DatasetCatalog.get("sem_list")
    assert [(Path(r["file_name"]), Path(r["sem_seg_file_name"])) for r in records] == pairs

    bad = tmp_path / "bad.txt"
    bad.write_text("image.jpg label.png\nonly_an_image.jpg\n")
    register_custom_dataset("sem_bad_list", "sem-seg-list", str(bad), classes=classes)
    with pytest.raises(ValueError, match="bad.txt, line 2: expected 'IMAGE LABEL'"):
        DatasetCatalog.get("sem_bad_list")


# ----------------------------------------------------------------------------- self-describing runs
# runs a repository script as __main__ and prints the texts its Visualizer drew
RECORD_DRAWN = """
import json, os, runpy, sys
from detectron2.utils.visualizer import Visualizer
drawn, draw_text = [], Visualizer.draw_text
def record(self, text, *args, **kwargs):
    drawn.append(text)
    return draw_text(self, text, *args, **kwargs)
Visualizer.draw_text = record
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("DRAWN " + json.dumps(drawn))
"""
PREDICT = """
import sys, cv2, knet
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer
from knet.config import get_knet_cfg
predictor = DefaultPredictor(get_knet_cfg(sys.argv[1], ["MODEL.DEVICE", "cpu"]))
assert not [name for name in DatasetCatalog.list() if name.startswith("self_")]
image = cv2.imread(sys.argv[2])
instances = predictor(image)["instances"].to("cpu")
Visualizer(image[:, :, ::-1], predictor.metadata).draw_instance_predictions(instances)
"""


def run_drawing(tmp_path, script: str, *args: str) -> list:
    """Run ``script`` (a repository path, or Python code) in a fresh process; returns the texts
    its Visualizer drew."""
    if "\n" in script:
        (tmp_path / "script.py").write_text(script)
        script = str(tmp_path / "script.py")
    cmd = [sys.executable, "-c", RECORD_DRAWN, str(REPO / script), *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return json.loads(result.stdout.split("DRAWN ")[-1])


@pytest.mark.slow
def test_a_run_names_its_classes_to_processes_that_register_nothing(tmp_path, data):
    run = tmp_path / "run"
    result = run_train_net(
        "--config-file", INSTANCE_CPU, *dataset_args(data, "instances", "self"), *TINY,
        "DATASETS.TRAIN", "('self_train',)", "DATASETS.TEST", "('self_val',)",
        "DATASETS.DROP_EMPTY_CATEGORIES", "True", "OUTPUT_DIR", str(run),
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # the same classes as DATASETS.DROP_CATEGORIES "['_background_']", recorded as that list
    assert saved["DATASETS"]["DROP_CATEGORIES"] == ["_background_"]
    assert saved["DATASETS"]["DROP_EMPTY_CATEGORIES"] is True
    assert saved["MODEL"]["KNET"]["CLASS_NAMES"] == ["cat", "dog"]
    assert len(saved["MODEL"]["KNET"]["CLASS_COLORS"]) == 2
    checkpoint = torch.load(run / "model_final.pth", weights_only=True)
    assert checkpoint["metadata"]["thing_classes"] == ["cat", "dog"]
    assert checkpoint["metadata"]["input_format"] == saved["INPUT"]["FORMAT"]
    assert checkpoint["metadata"]["min_size_test"] == 64

    names = {"cat", "dog"}
    image = Path(data["instances"]["val"][1]) / "img_004.jpg"
    drawn = run_drawing(tmp_path, PREDICT, str(run), str(image))  # DefaultPredictor + Visualizer
    assert drawn and {text.split()[0] for text in drawn} <= names, drawn
    vis = tmp_path / "demo.jpg"
    demo = ["--config-file", str(run), "--input", str(image), "--output", str(vis)]
    drawn = run_drawing(tmp_path, "demo/demo.py", *demo, "--confidence-threshold", "0")
    assert drawn and {text.split()[0] for text in drawn} <= names, drawn

    export = [sys.executable, "tools/deploy/export_model.py", "--config-file", str(run),
              "--output", str(tmp_path / "export")]  # fmt: skip
    result = subprocess.run(export, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = tmp_path / "export" / "model.ts"
    metadata = ExportedKNet(str(exported)).metadata
    assert metadata["thing_classes"] == ["cat", "dog"] and len(metadata["thing_colors"]) == 2

    large = tmp_path / "large.jpg"  # twice the test size: run at 64x80, drawn at 128x160
    cv2.imwrite(str(large), cv2.resize(cv2.imread(str(image)), (160, 128)))
    for threshold, expected in (("0", names), ("1.01", set())):
        out = tmp_path / f"vis_{threshold}"
        drawn = run_drawing(
            tmp_path, "tools/deploy/run_exported.py", "--model", str(exported), "--input",
            str(large), "--output", str(out), "--confidence-threshold", threshold,
        )  # fmt: skip
        assert {text.split()[0] for text in drawn} == expected, drawn
        assert cv2.imread(str(out / "large.png")).shape == (128, 160, 3)
