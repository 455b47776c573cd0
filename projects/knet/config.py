"""Config keys of K-Net (``MODEL.KNET.*`` and a few shared ``INPUT``/``SOLVER`` keys).

Defaults reproduce the official COCO panoptic/instance recipe; see ``configs/`` for the task
specific values. Key names follow Mask2Former where they mean the same thing.
"""

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from detectron2.config import CfgNode as CN

# Keys renamed in this release: former name -> current name (under MODEL.KNET.TEST). A value
# set under the former name is used, with a warning; the former names go in the next release.
RENAMED_KEYS = {
    "INSTANCE_SCORE_THRESH": "PANOPTIC_THING_SCORE_THRESH",
    "SCORE_THRESH": "INSTANCES_SCORE_THRESH",
}


def add_knet_config(cfg: CN) -> None:
    """Add the K-Net keys to a Detectron2 config (call before ``merge_from_file``)."""
    # ---------------------------------------------------------------- data
    # "knet_panoptic", "knet_instance" or "knet_semantic" (see knet.data.kinds)
    cfg.INPUT.DATASET_MAPPER_NAME = "knet_panoptic"
    # Semantic crops: maximum share of one category in a crop (official ADE20K recipe: 0.75).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.INPUT.COLOR_AUG_SSD = False  # photometric distortion (semantic recipe)
    # Ground truth checks before inference / training (knet.evaluation; once per dataset version,
    # cached in $KNET_CACHE/checks): "error" fails on any defect but zero-area masks (warned about;
    # training skips them); "warn" turns panoptic segment-id mismatches and polygons of < 3 points
    # into one warning with counts (other defects still fail); "off" skips the checks.
    cfg.DATASETS.CHECK_GT = "error"
    # Datasets registered from files (--dataset, knet.data.datasets.register_custom_dataset):
    # categories without annotations to leave out, e.g. ["_background_"] of labelling tools.
    cfg.DATASETS.DROP_CATEGORIES = []
    # True: also leave out every category without annotations in the training datasets; training
    # adds their names to DROP_CATEGORIES, so the run's config.yaml lists them for later commands.
    cfg.DATASETS.DROP_EMPTY_CATEGORIES = False

    # Training from MODEL.WEIGHTS: load a file that would set less than half of the model from
    # less than half of its own weights (another model's file; refused by default, knet.checkpoint)
    cfg.MODEL.WEIGHTS_PARTIAL = False

    # ---------------------------------------------------------------- backbone
    # ResNet options of "build_knet_resnet_backbone" (semantic K-Net). Same names and meanings
    # as Detectron2's DeepLab project, so both configs can be added in either order.
    if not cfg.MODEL.RESNETS.get("STEM_TYPE"):
        cfg.MODEL.RESNETS.STEM_TYPE = "basic"  # "deeplab": 3 x 3x3 convs (ResNetV1c deep stem)
    if "RES4_DILATION" not in cfg.MODEL.RESNETS:
        cfg.MODEL.RESNETS.RES4_DILATION = 1
    # First block of a dilated stage uses half the dilation (MMSeg ResNetV1c, D8 models).
    cfg.MODEL.RESNETS.CONTRACT_DILATION = True
    # Swin Transformer ("build_knet_swin_backbone", "build_knet_swin_fpn_backbone"): Mask2Former's
    # MODEL.SWIN keys, same names and meanings, so both configs can be added in either order.
    if "SWIN" not in cfg.MODEL:
        cfg.MODEL.SWIN = CN()
        cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224  # size of the absolute position embedding (APE)
        cfg.MODEL.SWIN.PATCH_SIZE = 4
        cfg.MODEL.SWIN.EMBED_DIM = 96
        cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
        cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
        cfg.MODEL.SWIN.WINDOW_SIZE = 7
        cfg.MODEL.SWIN.MLP_RATIO = 4.0
        cfg.MODEL.SWIN.QKV_BIAS = True
        cfg.MODEL.SWIN.QK_SCALE = None  # None: (width / heads) ** -0.5
        cfg.MODEL.SWIN.DROP_RATE = 0.0
        cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
        cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
        cfg.MODEL.SWIN.APE = False
        cfg.MODEL.SWIN.PATCH_NORM = True
        cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.SWIN.USE_CHECKPOINT = False  # activation checkpointing of every block

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # lr multiplier for the backbone body (the ResNet, not the FPN: the official code gives the
    # FPN neck the full learning rate).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.25
    # weight decay of Swin's relative position bias tables and absolute position embedding
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # In addition to Detectron2's "value"/"norm": "full_model" clips the global gradient norm
    # over all parameters (the official recipe, max norm 1.0).
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True

    cfg.MODEL.KNET = CN()

    # ---------------------------------------------------------------- pixel decoder
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "KNetLocalizationFPN"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # width of the pixel decoder's outputs, hence of the kernels and the update stages
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    # -1: taken from the training dataset (knet.engine.dataset_config), the one way to say so; the
    # COCO, ADE20K and toy configs set their numbers
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = -1
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255

    # ---------------------------------------------------------------- semantic K-Net (ADE20K)
    # Decode heads used as pixel decoders ("KNetUPerHead", "KNetFCNHead", "KNetPSPHead",
    # "KNetASPPHead"); their width is MODEL.SEM_SEG_HEAD.CONVS_DIM.
    cfg.MODEL.KNET.DECODE_HEAD = CN()
    cfg.MODEL.KNET.DECODE_HEAD.POOL_SCALES = [1, 2, 3, 6]  # pyramid pooling (PSPNet, UPerNet)
    cfg.MODEL.KNET.DECODE_HEAD.DILATIONS = [1, 12, 24, 36]  # ASPP branches (DeepLabV3)
    cfg.MODEL.KNET.DECODE_HEAD.NUM_CONVS = 2  # FCN
    cfg.MODEL.KNET.DECODE_HEAD.CONCAT_INPUT = True  # FCN: conv_cat over [input, convs(input)]
    cfg.MODEL.KNET.DECODE_HEAD.DROPOUT = 0.1  # Dropout2d before the classifier (conv_seg)
    # Auxiliary FCN head on a backbone feature, trained with cross-entropy; weight 0: no head.
    cfg.MODEL.KNET.AUX_HEAD = CN()
    cfg.MODEL.KNET.AUX_HEAD.LOSS_WEIGHT = 0.0
    cfg.MODEL.KNET.AUX_HEAD.IN_FEATURE = "res4"
    cfg.MODEL.KNET.AUX_HEAD.CHANNELS = 256
    cfg.MODEL.KNET.AUX_HEAD.NUM_CONVS = 1
    # Cross-entropy reduction: False = mean over all pixels, ignored ones included (MMSeg 0.x,
    # official); True = mean over the non-ignored pixels.
    cfg.MODEL.KNET.SEM_SEG_LOSS_AVG_NON_IGNORE = False
    # Xavier-uniform init of the update stages (official for instance/panoptic). The official
    # semantic heads never call it and keep PyTorch's default init (semantic configs: False).
    cfg.MODEL.KNET.XAVIER_INIT_STAGES = True

    # ---------------------------------------------------------------- K-Net
    cfg.MODEL.KNET.KERNEL_HEAD_NAME = "KNetIterativeKernelHead"
    cfg.MODEL.KNET.NUM_THING_CLASSES = -1  # classes 0..K-1 are things, the rest stuff; -1: data
    # The names and RGB colours of the classes, in the classifier's order: filled from the training
    # dataset when training starts, so that the run's config.yaml (and its checkpoints) name the
    # model's outputs without the dataset (knet.data.kinds.model_metadata). They belong to the
    # model like the class counts; [] (a config that never trained): names from a registered
    # dataset, or class numbers.
    cfg.MODEL.KNET.CLASS_NAMES = []
    cfg.MODEL.KNET.CLASS_COLORS = []
    cfg.MODEL.KNET.NUM_PROPOSALS = 100  # thing kernels (stuff kernels are added for panoptic)
    cfg.MODEL.KNET.NUM_STAGES = 3
    cfg.MODEL.KNET.NHEADS = 8
    cfg.MODEL.KNET.DIM_FEEDFORWARD = 2048
    cfg.MODEL.KNET.DROPOUT = 0.0
    cfg.MODEL.KNET.UPDATOR_DIM = 256  # feat_channels of the KernelUpdator
    cfg.MODEL.KNET.NUM_CLS_FCS = 1
    cfg.MODEL.KNET.NUM_MASK_FCS = 1
    cfg.MODEL.KNET.HARD_MASK_THRESHOLD = 0.5  # group features use sigmoid(mask) > thr
    cfg.MODEL.KNET.MASK_UPSAMPLE_STRIDE = 2  # stride-8 masks -> stride-4 for losses/output
    cfg.MODEL.KNET.SIZE_DIVISIBILITY = 32
    # Run the network on channels-last (NHWC) images: the same results up to rounding, faster
    # convolutions on CPUs (oneDNN) and tensor-core GPUs.
    cfg.MODEL.KNET.CHANNELS_LAST = True
    cfg.MODEL.KNET.POSITIONAL_ENCODING = True  # sine PE added to P5 in the localization FPN
    cfg.MODEL.KNET.KERNEL_INIT_STD = 1.0  # std of the learned initial thing kernels
    # losses (weights as in the official configs)
    cfg.MODEL.KNET.CLASS_WEIGHT = 2.0
    cfg.MODEL.KNET.MASK_WEIGHT = 1.0
    cfg.MODEL.KNET.DICE_WEIGHT = 4.0
    cfg.MODEL.KNET.RANK_WEIGHT = 0.1  # panoptic only; 0 disables
    cfg.MODEL.KNET.SEG_WEIGHT = 1.0  # semantic focal loss of the initial head
    # the initial head's semantic loss: "focal" (K-Net) or "cross_entropy" (softmax, background
    # ignored, the mean over all pixels: Video K-Net's video panoptic configs)
    cfg.MODEL.KNET.SEG_LOSS_TYPE = "focal"
    # panoptic: the rank loss in the update stages as well as the initial head (False: the
    # initial head only, as Video K-Net's video panoptic configs)
    cfg.MODEL.KNET.STAGE_RANK_LOSS = True
    cfg.MODEL.KNET.FOCAL_ALPHA = 0.25
    cfg.MODEL.KNET.FOCAL_GAMMA = 2.0
    cfg.MODEL.KNET.STAGE_LOSS_WEIGHTS = [1.0, 1.0, 1.0]
    # Hungarian matching costs
    cfg.MODEL.KNET.COST_CLASS = 2.0
    cfg.MODEL.KNET.COST_MASK = 1.0
    cfg.MODEL.KNET.COST_DICE = 4.0
    # Lower bounds of the mask probabilities in the (dice, mask) costs: none in image K-Net;
    # Video K-Net's matcher clamps them to (0.001, 0.01) (the video configs set that).
    cfg.MODEL.KNET.MATCHER_MIN_PROBS = [0.0, 0.0]
    # Training in several processes. False (official): each process pads its images to its own
    # largest and divides the mask, dice and initial semantic losses by its own counts (and the
    # semantic cross-entropy with SEM_SEG_LOSS_AVG_NON_IGNORE); the classification loss by the
    # mean count over processes, clamped to >= 1. True: the images are padded to the global
    # batch's largest, and every normaliser is max(global count, 1) / processes, so that DDP's
    # average of the gradients is the gradient of the global batch's loss. With SEED >= 0 and
    # batch statistics shared ("SyncBN", or no BN in training), the weights then do not depend on
    # the number of processes (up to rounding). One process: the same results either way.
    cfg.MODEL.KNET.GLOBAL_BATCH_LOSSES = False

    cfg.MODEL.KNET.TEST = CN()
    cfg.MODEL.KNET.TEST.PANOPTIC_ON = True
    cfg.MODEL.KNET.TEST.INSTANCE_ON = False
    cfg.MODEL.KNET.TEST.SEMANTIC_ON = False
    cfg.MODEL.KNET.TEST.MASK_THRESHOLD = 0.5
    # "panoptic_seg": thing kernels scoring below this are dropped (stuff is never thresholded;
    # the official instance_score_thr)
    cfg.MODEL.KNET.TEST.PANOPTIC_THING_SCORE_THRESH = 0.3
    # "panoptic_seg": a kernel must own this share of its own mask to be kept (overlap_thr)
    cfg.MODEL.KNET.TEST.OVERLAP_THRESHOLD = 0.6
    # "panoptic_seg": the thing candidates are the top TEST.DETECTIONS_PER_IMAGE (kernel, class)
    # pairs, so a kernel may compete with two classes (Video K-Net's merge_joint), instead of
    # each thing kernel with its best class (K-Net)
    cfg.MODEL.KNET.TEST.PANOPTIC_JOINT_MERGE = False
    # "instances": the top TEST.DETECTIONS_PER_IMAGE (kernel, class) pairs scoring >= this
    # (0.0: unthresholded, the official output for COCO mask AP)
    cfg.MODEL.KNET.TEST.INSTANCES_SCORE_THRESH = 0.0
    # Former names, still read (with a warning) in this release: see RENAMED_KEYS.
    for former in RENAMED_KEYS:
        cfg.MODEL.KNET.TEST[former] = None
    # kernels / classes resized to full resolution at once (memory vs speed)
    cfg.MODEL.KNET.TEST.MERGE_CHUNK_SIZE = 16
    # Mixed-precision inference: the network (not the post-processing) runs under autocast in
    # this dtype: "" (off, float32), "float16", "bfloat16" or "auto" (float16 on CUDA, bfloat16
    # on the CPU); the demo's and the benchmark's --amp set "auto".
    cfg.MODEL.KNET.TEST.AMP_DTYPE = ""

    # ---------------------------------------------------------------- Video K-Net (VideoKNet)
    # Defaults: the official R-50 video panoptic configs (kernel association embedding and
    # kernel linking; no kernel fusion).
    cfg.MODEL.KNET.VIDEO = CN()
    # kernel linking: the last stage's kernels attend to the previous frame's before they are
    # embedded (False: the plain kernels are embedded, "+KAE" of the paper's ablation)
    cfg.MODEL.KNET.VIDEO.LINK_PREVIOUS = True
    # "ffn": the kernels attend to the previous frame's (the R-50 configs); "update": the previous
    # frame's kernels are first updated with this frame's group features (a KernelUpdator; the
    # Swin configs' previous_type "update")
    cfg.MODEL.KNET.VIDEO.LINK_TYPE = "ffn"
    # kernel fusion: the last stage's input kernels attend to the previous frame's, updated with
    # this frame's group features (the Swin configs' update_dynamic_cov; off in the R-50 ones)
    cfg.MODEL.KNET.VIDEO.KERNEL_FUSION = False
    cfg.MODEL.KNET.VIDEO.EMBED_DIM = 256
    # association losses: multi-positive cross-entropy of the embeddings' dot products, and the
    # hard-mined L2 loss of their cosine similarities (negative margin, negatives per positive)
    cfg.MODEL.KNET.VIDEO.TRACK_WEIGHT = 0.25
    cfg.MODEL.KNET.VIDEO.TRACK_AUX_WEIGHT = 1.0
    cfg.MODEL.KNET.VIDEO.TRACK_AUX_NEG_MARGIN = 0.1
    cfg.MODEL.KNET.VIDEO.TRACK_AUX_NEG_POS_RATIO = 3
    # tracker boxes (duplicate removal, backdrops) keep only the pixels the initial head's
    # semantic map calls a thing
    cfg.MODEL.KNET.VIDEO.SEMANTIC_FILTER = True
    # the quasi-dense embedding tracker (official values of the video panoptic configs)
    cfg.MODEL.KNET.VIDEO.TRACKER = CN()
    cfg.MODEL.KNET.VIDEO.TRACKER.INIT_SCORE_THRESH = 0.35  # a new track needs this score
    cfg.MODEL.KNET.VIDEO.TRACKER.OBJ_SCORE_THRESH = 0.3  # a match needs this score
    cfg.MODEL.KNET.VIDEO.TRACKER.MATCH_SCORE_THRESH = 0.5  # ... and this bi-softmax similarity
    cfg.MODEL.KNET.VIDEO.TRACKER.MEMORY_FRAMES = 5  # a track unseen this long is deleted
    cfg.MODEL.KNET.VIDEO.TRACKER.BACKDROP_FRAMES = 1
    cfg.MODEL.KNET.VIDEO.TRACKER.MOMENTUM = 0.8  # weight of the new embedding
    cfg.MODEL.KNET.VIDEO.TRACKER.NMS_CONF_THRESH = 0.5
    cfg.MODEL.KNET.VIDEO.TRACKER.NMS_BACKDROP_IOU_THRESH = 0.3
    cfg.MODEL.KNET.VIDEO.TRACKER.NMS_CLASS_IOU_THRESH = 0.7
    cfg.MODEL.KNET.VIDEO.TRACKER.WITH_CATS = True  # class-aware matching
    # True: the official code's assignment of ids to segments (ids of the sorted, deduplicated
    # detections painted on the segments in their own order); False: each id on its segment
    cfg.MODEL.KNET.VIDEO.TRACKER.OFFICIAL_ID_ALIGNMENT = False
    # clip-level video instance segmentation (VideoKNetClip, the official KNetTrack): the first
    # CLIP_STAGES of the clip head update one kernel set for the whole clip (its class logits),
    # the rest every frame's copy; a video's CLIP_TOPK best (kernel, class) pairs are its objects
    cfg.MODEL.KNET.VIDEO.CLIP_STAGES = 2
    cfg.MODEL.KNET.VIDEO.CLIP_TOPK = 10

    # ---------------------------------------------------------------- mixed-precision training
    # Autocast dtype of SOLVER.AMP.ENABLED (knet.engine.amp): "auto" (float16 on CUDA, bfloat16 on
    # CPU), "float16" (CUDA only, Detectron2's AMPTrainer with a grad scaler) or "bfloat16"
    # (CUDA or CPU, no grad scaler). Group-feature sums, matching costs and losses stay fp32.
    cfg.SOLVER.AMP.DTYPE = "auto"


def test_option(cfg: CN, name: str):
    """``cfg.MODEL.KNET.TEST.<name>``, or the value set under its former name (RENAMED_KEYS)."""
    test = cfg.MODEL.KNET.TEST
    for former, current in RENAMED_KEYS.items():
        if current == name and test.get(former) is not None:
            logging.getLogger(__name__).warning(
                "MODEL.KNET.TEST.%s is deprecated: use MODEL.KNET.TEST.%s", former, current
            )
            return test[former]
    return test[name]


def _leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def load_knet_config(config_file: str = "", opts: Sequence[str] = ()) -> tuple[CN, frozenset[str]]:
    """A Detectron2 config with the K-Net keys, merged from ``config_file`` (with its ``_BASE_``
    files) and the ``KEY VALUE`` list ``opts``, and the keys these two set.

    A run's output folder as ``config_file`` stands for the trained model: its ``config.yaml``
    (class counts and names included) and, unless ``opts`` set ``MODEL.WEIGHTS``, its last
    checkpoint (the ``last_checkpoint`` tag, else ``model_final.pth``).

    The YAML is parsed once. The keys tell ``knet.engine.dataset_config`` which outputs
    and ignore value the user chose (a ``CfgNode`` cannot tell a default from a set value).
    """
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_knet_config(cfg)
    keys: set[str] = set()
    if config_file and os.path.isdir(config_file):
        config_file, opts = _run_config(config_file, list(opts))
    if config_file:
        loaded = CN.load_yaml_with_base(config_file, allow_unsafe=True)
        # K-Net's configs are of the current Detectron2 config version: no upgrade to run
        cfg.merge_from_other_cfg(CN(loaded))
        keys.update(_leaf_keys(loaded))
    cfg.merge_from_list(list(opts))
    keys.update(str(k) for k in list(opts)[0::2])
    return cfg, frozenset(keys)


def _run_config(folder: str, opts: list[str]) -> tuple[str, list[str]]:
    config_file = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{folder} holds no config.yaml: not the output folder of a run")
    if "MODEL.WEIGHTS" in opts[0::2]:
        return config_file, opts
    tag, name = os.path.join(folder, "last_checkpoint"), "model_final.pth"
    if os.path.isfile(tag):
        with open(tag, encoding="utf-8") as f:
            name = f.read().strip()
    weights = os.path.join(folder, name)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"No checkpoint in the run folder {folder} ({name} not found)")
    return config_file, ["MODEL.WEIGHTS", weights, *opts]


def get_knet_cfg(config_file: str = "", opts: Sequence[str] = ()) -> CN:
    """A Detectron2 config with the K-Net keys, merged from ``config_file`` and ``opts``."""
    return load_knet_config(config_file, opts)[0]
