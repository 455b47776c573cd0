"""Official (MMSeg) semantic K-Net weights: a synthetic checkpoint with the official key layout
converts, loads into the model built from our ADE20K config with no missing or unexpected key,
and the converted model computes what the official code computes: decode head, initial
logits, three softmax-grouped update stages (512-wide kernels split into updator halves) and the
auxiliary head, each checked against independent functional references."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from references.knet_heads import ref_update_head
from references.layouts import make_mmseg_state_dict
from references.mmcv import ref_conv_module
from references.mmseg import ref_aspp, ref_fcn, ref_psp, ref_uper

from knet.checkpoint import KNetCheckpointer
from knet.conversion import convert_official_knet_state_dict, save_detectron2_checkpoint
from knet.engine import get_knet_cfg

ROOT = Path(__file__).resolve().parents[1]
ADE = ROOT / "configs/ade20k/semantic-segmentation"
CONFIGS = {
    "upernet": ADE / "knet_s3_upernet_R50_bs16_80k.yaml",
    "fcn": ADE / "knet_s3_fcn_R50_D8_bs16_80k.yaml",
    "psp": ADE / "knet_s3_pspnet_R50_D8_bs16_80k.yaml",
    "aspp": ADE / "knet_s3_deeplabv3_R50_D8_bs16_80k.yaml",
}
# Narrow versions of the official shapes (ResNetV1c-50 at 1/8 width, 64-wide heads whose
# kernels are updated as two 32-d halves, as the 512-wide official heads use 2 x 256).
SMALL = dict(
    num_classes=11, channels=64, updator_channels=32, ffn_channels=96, base_width=8,
    aux_channels=16, lazy=False,
)  # fmt: skip
NARROW_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.SEM_SEG_HEAD.NORM", "BN",
    "MODEL.KNET.NHEADS", "4",
    "MODEL.DEVICE", "cpu",
    # the head widths of SMALL
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "11",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "64",
    "MODEL.KNET.UPDATOR_DIM", "32",
    "MODEL.KNET.DIM_FEEDFORWARD", "96",
    "MODEL.KNET.AUX_HEAD.CHANNELS", "16",
]  # fmt: skip


def converted_model(head: str, tmp_path):
    """(official state dict, model loaded from the converted checkpoint file)."""
    official = make_mmseg_state_dict(head, seed=3, **SMALL)
    # N(0, 1) weights scaled by 1/sqrt(fan_in) keep activations O(1) through the deep network
    # (float32 probabilities must not overflow); BN statistics stay away from (0, 1)
    with torch.no_grad():
        for v in official.values():
            if v.dim() > 1:
                v.mul_(v[0].numel() ** -0.5)
    model = build_model(get_knet_cfg(str(CONFIGS[head]), NARROW_OPTS)).eval()
    converted = convert_official_knet_state_dict(
        {"meta": {"CLASSES": [str(i) for i in range(11)]}, "state_dict": official},
        {k: v.shape for k, v in model.state_dict().items()},
    )
    path = str(tmp_path / f"knet_{head}.pth")
    save_detectron2_checkpoint(converted, path, author="test")
    checkpointer = KNetCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    return official, model.double()


def strip(sd, prefix):
    return {k[len(prefix) :]: v.double() for k, v in sd.items() if k.startswith(prefix)}


def ref_decode_head(head, official, features):
    """The MMSeg decode head's pre-classifier feature from the official weights."""
    sd = strip(official, "decode_head.kernel_generate_head.")
    sd = {k.replace(".conv.weight", ".weight").replace(".bn.", ".norm."): v for k, v in sd.items()}
    if head == "upernet":
        return ref_uper(sd, [features[f"res{i}"] for i in range(2, 6)], (1, 2, 3, 6))
    x = features["res5"]
    if head == "fcn":
        return ref_fcn(sd, x, 2, True)
    if head == "psp":
        return ref_psp(sd, x, (1, 2, 3, 6))
    return ref_aspp(sd, x, (1, 12, 24, 36))


def ref_stage_params(official, s):
    """Official stage weights under the reference's parameter names."""
    sd = strip(official, f"decode_head.kernel_update_head.{s}.")
    renames = {
        "attention.attn.": "attention.",
        "feat_transform.conv.": "feat_transform.",
        "ffn.layers.0.0.": "ffn.0.",
        "ffn.layers.1.": "ffn.3.",
    }
    out = {}
    for k, v in sd.items():
        for old, new in renames.items():
            k = k.replace(old, new)
        out[k] = v
    return out


@pytest.mark.parametrize("head", sorted(CONFIGS))
def test_converted_semantic_model_matches_official_computation(head, tmp_path):
    official, model = converted_model(head, tmp_path)
    gen = torch.Generator().manual_seed(5)
    image = torch.randint(0, 256, (3, 75, 99), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        images = model.preprocess_image([{"image": image.double()}])
        features = model.backbone(images.tensor)
        (feats,) = model.pixel_decoder.forward_features(features)
        out = model.kernel_head(feats)["stages"][-1]["seg_logits"]
        result = model([{"image": image.double()}])[0]["sem_seg"]
        aux = model.auxiliary_head(features)

    # decode head -> initial logits and kernels (conv_seg) -> 3 softmax-grouped stages
    ref_feats = ref_decode_head(head, official, features)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-9, atol=1e-9)
    w = official["decode_head.kernel_generate_head.conv_seg.weight"].double()
    b = official["decode_head.kernel_generate_head.conv_seg.bias"].double()
    logits = F.conv2d(ref_feats, w, b)
    kernels = w.flatten(1)[None]
    for s in range(3):
        ref = ref_update_head(ref_stage_params(official, s), ref_feats, kernels, logits, 4, None)
        kernels, logits = ref["kernels"], ref["masks"]
        assert "cls" not in ref
    torch.testing.assert_close(out, logits, rtol=1e-7, atol=1e-7)
    # whole-image inference: resize to the input, softmax over the classes
    expected = F.interpolate(logits, size=(75, 99), mode="bilinear", align_corners=False)
    assert result.dtype == torch.float32  # probabilities are returned in float32
    torch.testing.assert_close(result, expected[0].softmax(0).float(), rtol=1e-5, atol=1e-6)

    # auxiliary FCN head on res4
    sd = strip(official, "auxiliary_head.")
    sd = {k.replace(".conv.weight", ".weight").replace(".bn.", ".norm."): v for k, v in sd.items()}
    ref_aux = F.conv2d(ref_conv_module(sd, "convs.0", features["res4"]), sd["conv_seg.weight"])
    ref_aux = ref_aux + sd["conv_seg.bias"][None, :, None, None]
    torch.testing.assert_close(aux, ref_aux, rtol=1e-9, atol=1e-9)
