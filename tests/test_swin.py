"""Swin Transformer backbone (``knet.modeling.backbone.swin``) against the official computation.

The reference is ``references.swin``: a functional re-implementation of MMDetection 2.x's
``SwinTransformer`` (the backbone the released K-Net models were trained with), its index and
mask buffers, Microsoft's index buffer and seeded state dicts in both checkpoint layouts. One
block is also checked against a dense formulation (full attention over the padded map with a
same-window constraint, no roll and no window partition). Sizes are tiny and odd so
that every padding path runs.
"""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN
from references.swin import (
    dense_block,
    microsoft_relative_position_index,
    microsoft_swin_state_dict,
    microsoft_to_mmdet,
    mmdet_patch_merging,
    mmdet_relative_position_index,
    mmdet_swin_forward,
    mmdet_swin_state_dict,
    shifted_window_attention_mask,
)
from scripts import REPO

from knet.conversion import convert_pretrained_backbone
from knet.conversion.rules import SWIN_MMDET, Section, rename_state_dict, unfold_to_slice_order
from knet.engine import get_knet_cfg
from knet.modeling.backbone.swin import (
    PatchMerging,
    SwinBlock,
    SwinTransformer,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

FEATURES = ("res2", "res3", "res4", "res5")
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
SWIN_L_CONFIG = "configs/coco/panoptic-segmentation/knet_swin_L_bs32_ms3x.yaml"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread (several only contend with each other on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def tiny_swin(**kwargs) -> SwinTransformer:
    """The TINY model, no stochastic depth (deterministic in train mode)."""
    return SwinTransformer(**{**TINY, "drop_path_rate": 0.0, **kwargs})


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial parameters: LayerNorm weights around 1, everything else O(0.3)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.3 * noise)


# ---------------------------------------------------------------------- index, mask, windows
@pytest.mark.parametrize("window", [1, 4, 7, 12])
def test_relative_position_index_matches_microsoft_and_mmdet(window):
    # integer buffers: exact equality
    index = relative_position_index(window)
    assert index.dtype == torch.int64 and index.shape == (window**2, window**2)
    assert torch.equal(index, microsoft_relative_position_index(window, window))
    assert torch.equal(index, mmdet_relative_position_index(window, window))


@pytest.mark.parametrize(
    "height, width, window, shift",
    [(8, 12, 4, 2), (14, 21, 7, 3), (4, 4, 4, 2), (12, 24, 12, 6), (8, 8, 4, 1)],
)
def test_shifted_window_mask_matches_reference(height, width, window, shift):
    # both take (height, width, window, shift) of the padded map; values are exactly 0 / -100
    mask = shifted_window_mask(height, width, window, shift, torch.device("cpu"))
    expected = shifted_window_attention_mask(height, width, window, shift)
    n_windows = (height // window) * (width // window)
    assert mask.shape == (n_windows, window**2, window**2)
    assert torch.equal(mask, expected)


def test_window_partition_order_and_round_trip():
    x = torch.randn(2, 8, 12, 3, generator=torch.Generator().manual_seed(0))
    windows = window_partition(x, 4)
    assert windows.shape == (2, 6, 16, 3)
    # window (r, c) of the 2 x 3 grid is number 3 r + c; token (i, j) in it is number 4 i + j
    for r in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(4):
                    assert torch.equal(windows[:, 3 * r + c, 4 * i + j], x[:, 4 * r + i, 4 * c + j])
    assert torch.equal(window_reverse(windows, 4, 8, 12), x)  # a permutation: exact


# ---------------------------------------------------------------------- one block, dense
@pytest.mark.parametrize("size", [(9, 11), (3, 2)])
@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_matches_dense_attention(size, shift):
    # float64, 1e-10 relative: the same sums in another order
    torch.manual_seed(0)
    block = SwinBlock(8, 2, window=4, shift=shift).double().eval()
    randomise(block, seed=1)
    with torch.no_grad():
        block.attn.relative_position_bias_table.mul_(3)  # a bias that matters
    x = torch.randn(2, *size, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    hp, wp = size[0] + (-size[0] % 4), size[1] + (-size[1] % 4)
    mask = shifted_window_attention_mask(hp, wp, 4, shift, torch.float64) if shift else None
    with torch.no_grad():
        got = block(x, mask)
        expected = dense_block(block, x)
    assert got.shape == x.shape
    assert relative_error(got, expected) < 1e-10


# ---------------------------------------------------------------------- patch merging
def test_unfold_to_slice_order_permutation():
    # restated: unfold feature 4 c + 2 dy + dx is slice feature C (dy + 2 dx) + c
    c = 3
    unfold = torch.arange(4 * c)
    slices = unfold_to_slice_order(unfold)
    for ch in range(c):
        for dy in range(2):
            for dx in range(2):
                assert slices[c * (dy + 2 * dx) + ch] == 4 * ch + 2 * dy + dx


@pytest.mark.parametrize("size", [(7, 10), (8, 8), (1, 1)])
@pytest.mark.parametrize("norm", [True, False])
def test_patch_merging_matches_mmdet(size, norm):
    # float64, 1e-10 relative
    c = 6
    gen = torch.Generator().manual_seed(0)
    norm_w = 1 + 0.1 * torch.randn(4 * c, generator=gen, dtype=torch.float64)
    norm_b = 0.1 * torch.randn(4 * c, generator=gen, dtype=torch.float64)
    reduction = torch.randn(2 * c, 4 * c, generator=gen, dtype=torch.float64)
    x = torch.randn(2, *size, c, generator=gen, dtype=torch.float64)
    merging = PatchMerging(c, norm=norm).double()
    with torch.no_grad():
        merging.reduction.weight.copy_(unfold_to_slice_order(reduction))
        if norm:
            merging.norm.weight.copy_(unfold_to_slice_order(norm_w))
            merging.norm.bias.copy_(unfold_to_slice_order(norm_b))
        got = merging(x)
    expected = mmdet_patch_merging(x, norm_w if norm else None, norm_b if norm else None, reduction)
    assert got.shape == (2, (size[0] + 1) // 2, (size[1] + 1) // 2, 2 * c)
    assert relative_error(got, expected) < 1e-10


# ---------------------------------------------------------------------- whole model, MMDet
def load_mmdet(model: SwinTransformer, sd: dict[str, torch.Tensor]) -> None:
    converted, _ = rename_state_dict(sd, (Section("", "", SWIN_MMDET),))
    incompatible = model.load_state_dict(converted, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys


@pytest.mark.parametrize(
    "window, qkv_bias, patch_norm, out_indices",
    [(4, True, True, (0, 1, 2, 3)), (7, True, True, (0, 1, 2, 3)), (4, False, False, (1, 3))],
)
def test_swin_matches_mmdet_forward(window, qkv_bias, patch_norm, out_indices):
    # float32: 1e-5 relative to the largest output value; float64: 1e-10
    dims = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=window)
    opts = dict(out_indices=out_indices, patch_norm=patch_norm)
    sd = mmdet_swin_state_dict(**dims, **opts, qkv_bias=qkv_bias, seed=3, prefix="")
    names = [FEATURES[i] for i in out_indices]
    model = tiny_swin(
        window_size=window, qkv_bias=qkv_bias, patch_norm=patch_norm, out_features=names
    )
    load_mmdet(model, sd)
    model.eval()
    gen = torch.Generator().manual_seed(4)
    for size in [(45, 61), (64, 64)]:
        image = torch.randn(2, 3, *size, generator=gen)
        for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-10)]:
            x = image.to(dtype)
            with torch.no_grad():
                got = model.to(dtype)(x)
            expected = mmdet_swin_forward(sd, x, **dims, **opts, prefix="")
            assert list(got) == names
            for name, ref in zip(names, expected):
                assert got[name].dtype == dtype and got[name].shape == ref.shape
                assert relative_error(got[name], ref) < tol, (size, dtype, name)


# ---------------------------------------------------------------------- Microsoft layout
def test_microsoft_checkpoint_converts_and_matches_mmdet():
    # float64, 1e-10 relative
    dims = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)
    sd = microsoft_swin_state_dict(**dims, seed=5)
    assert any(k.endswith("attn_mask") for k in sd)  # the layout really has the buffers
    converted, name = convert_pretrained_backbone({"model": sd})
    assert name == "Swin(embed 16, depths [2, 2, 2, 2])"  # not a released size: described
    for key in converted:
        assert not key.startswith(("head.", "norm.")), key
        assert not key.endswith(("attn_mask", "relative_position_index")), key

    model = tiny_swin(window_size=7)
    incompatible = model.load_state_dict(converted, strict=False)
    assert not incompatible.unexpected_keys
    assert sorted(incompatible.missing_keys) == sorted(
        f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")
    )
    # with the model's shapes, under both body prefixes (plain backbone and FPN)
    body = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for prefix in ("backbone.", "backbone.bottom_up."):
        checked, _ = convert_pretrained_backbone(
            {"model": sd}, {prefix + k: s for k, s in body.items()}
        )
        assert checked.keys() == converted.keys()

    # same function as MMDet's Swin with the same weights (output norms: identity here)
    reference = microsoft_to_mmdet(sd)
    for i in range(4):
        reference[f"norm{i}.weight"] = torch.ones(16 * 2**i)
        reference[f"norm{i}.bias"] = torch.zeros(16 * 2**i)
    model.double().eval()
    x = torch.randn(1, 3, 37, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = model(x)
    expected = mmdet_swin_forward(reference, x, **dims, prefix="")
    for name, ref in zip(FEATURES, expected):
        assert relative_error(got[name], ref) < 1e-10, name


def test_microsoft_checkpoint_names():
    lazy = dict(lazy=True, num_classes=0)
    _, name = convert_pretrained_backbone(
        {"model": microsoft_swin_state_dict(96, (2, 2, 6, 2), (3, 6, 12, 24), **lazy)}
    )
    assert name == "Swin-T"
    _, name = convert_pretrained_backbone(
        {"model": microsoft_swin_state_dict(192, (2, 2, 18, 2), (6, 12, 24, 48), **lazy)}
    )
    assert name == "Swin-L"
    sd = microsoft_swin_state_dict(16, (2, 2, 2, 2), (1, 2, 4, 8), 12, img_size=384, **lazy)
    _, name = convert_pretrained_backbone({"model": sd})
    assert name == "Swin(embed 16, depths [2, 2, 2, 2])-W12"


def test_swin_t_checkpoint_fits_swin_t_model():
    # full-size keys and shapes (stride-0 tensors), model built on the meta device
    sd = microsoft_swin_state_dict(96, (2, 2, 6, 2), (3, 6, 12, 24), lazy=True)
    with torch.device("meta"):
        model = SwinTransformer()  # defaults: Swin-T
    shapes = {"backbone." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted, name = convert_pretrained_backbone({"model": sd}, shapes)
    assert name == "Swin-T"
    missing = {k[len("backbone.") :] for k in shapes} - set(converted)
    assert missing == {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}


# ---------------------------------------------------------------------- shapes and options
@pytest.mark.parametrize("size", [(33, 50), (4, 4), (1, 70)])
def test_output_shapes_match_output_shape(size):
    model = tiny_swin(window_size=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    specs = model.output_shape()
    assert list(out) == list(FEATURES) == list(specs)
    for i, name in enumerate(FEATURES):
        stride = 4 * 2**i
        assert specs[name].stride == stride and specs[name].channels == 16 * 2**i
        h, w = -(-size[0] // stride), -(-size[1] // stride)  # ceil
        assert out[name].shape == (2, specs[name].channels, h, w), name


def test_out_features_subset():
    model = tiny_swin(window_size=4, out_features=["res5", "res3"]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 50))
    assert list(out) == ["res3", "res5"]
    assert set(model.output_shape()) == {"res3", "res5"}
    norms = {k.split(".")[0] for k in model.state_dict() if k.startswith("norm")}
    assert norms == {"norm1", "norm3"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depths=(2, 2, 2)), "DEPTHS and NUM_HEADS need 4 entries"),
        (dict(num_heads=(1, 2, 4, 8, 16)), "DEPTHS and NUM_HEADS need 4 entries"),
        (dict(out_features=["res6"]), "OUT_FEATURES"),
        (dict(num_heads=(3, 2, 4, 8)), "not divisible by 3 heads"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_swin(**kwargs)


def test_bad_shift_and_input_rank_are_rejected():
    with pytest.raises(ValueError, match="shift"):
        SwinBlock(8, 2, window=4, shift=4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tiny_swin(window_size=4)(torch.randn(3, 32, 32))


def test_activation_checkpointing_gives_same_outputs_and_gradients(monkeypatch):
    # same computation recomputed: 1e-6 relative in float32 (equal in practice)
    calls: list[int] = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    torch.manual_seed(0)
    plain = tiny_swin(window_size=4)
    checkpointed = tiny_swin(window_size=4, use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 37, 45, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, checkpointed):
        model.train()
        out = model(x)
        loss = sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in out.values())
        loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert len(calls) == sum(TINY["depths"])  # every block went through checkpoint()
    (out_a, grads_a), (out_b, grads_b) = results
    for name in FEATURES:
        assert relative_error(out_b[name].detach(), out_a[name].detach()) < 1e-6
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert grad is not None and grads_b[name] is not None, name
        assert relative_error(grads_b[name], grad) < 1e-6, name

    calls.clear()
    with torch.no_grad():
        checkpointed.eval()(x)
    assert not calls  # eval mode: no recomputation


# ---------------------------------------------------------------------- builders
NARROW_SWIN = [
    "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.SWIN.NUM_HEADS", "[1, 2, 4, 8]", "MODEL.SWIN.WINDOW_SIZE", "4",
    "MODEL.FPN.OUT_CHANNELS", "32",
]  # fmt: skip


def test_build_knet_swin_backbone_from_config():
    cfg = get_knet_cfg(str(REPO / SWIN_L_CONFIG), NARROW_SWIN + ["MODEL.SWIN.APE", "True"])
    model = BACKBONE_REGISTRY.get("build_knet_swin_backbone")(cfg, ShapeSpec(channels=3))
    assert isinstance(model, SwinTransformer)
    assert model.absolute_pos_embed.shape == (1, 16, 56, 56)  # PRETRAIN_IMG_SIZE 224 / 4
    blocks = [b for stage in model.layers for b in stage.blocks]
    assert [b.window for b in blocks] == [4] * 8
    assert [b.shift for b in blocks] == [0, 2] * 4
    assert blocks[-1].drop_path.p == pytest.approx(cfg.MODEL.SWIN.DROP_PATH_RATE)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 50))
    for name, spec in model.output_shape().items():
        assert out[name].shape[1] == spec.channels
        assert out[name].shape[2:] == (-(-33 // spec.stride), -(-50 // spec.stride))


def test_build_knet_swin_fpn_backbone_from_config():
    cfg = get_knet_cfg(str(REPO / SWIN_L_CONFIG), NARROW_SWIN)
    assert cfg.MODEL.BACKBONE.NAME == "build_knet_swin_fpn_backbone"
    fpn = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, ShapeSpec(channels=3))
    assert isinstance(fpn, FPN) and isinstance(fpn.bottom_up, SwinTransformer)
    fpn.eval()
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 64, 96))
    specs = fpn.output_shape()
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] == list(specs)
    for name, spec in specs.items():
        assert spec.channels == 32
        size = (-(-64 // spec.stride), -(-96 // spec.stride))  # ceil: p6 pools a 2 x 3 p5
        assert out[name].shape == (1, 32, *size), name
