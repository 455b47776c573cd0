"""Deformable convolution on torchvision: ``DeformConv`` and ``DeformBottleneckBlock``.

Every result is compared with a computation written independently of the product code: MMCV's
DCNv1 sampling rule re-implemented by bilinear sampling (``references.mmcv``),
``torch.nn.functional.conv2d`` for zero offsets, Detectron2's own blocks for the state-dict
layout, and a functional forward of the block assembled from its state dict
(``references.resnet``).
"""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from detectron2.modeling.backbone.resnet import (
    DeformBottleneckBlock as D2DeformBottleneckBlock,
)
from references.mmcv import mmcv_deform_conv2d
from references.resnet import detectron2_deform_bottleneck
from torch import nn

from knet.modeling.backbone.deform_conv import DeformBottleneckBlock, DeformConv

F64_TOL = 1e-10  # float64: both sides sum the same few products, rounding is ~1e-15
F32_TOL = 1e-5  # float32, CUDA vs CPU: accumulation order differs, values are O(1)
BN_EPS = 1e-5  # BatchNorm2d and FrozenBatchNorm2d default, used by "BN" and "FrozenBN"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sample_positions(offset, h_in, w_in, kernel, stride, padding, dilation):
    """Sampling rows and columns ``p * stride - padding + t * dilation + offset`` per tap."""
    bsz, _, h_out, w_out = offset.shape
    off = offset.reshape(bsz, -1, kernel * kernel, 2, h_out, w_out)
    taps = torch.arange(kernel * kernel)
    rows = torch.arange(h_out) * stride - padding
    cols = torch.arange(w_out) * stride - padding
    grid_y = rows[None, :, None] + (taps // kernel * dilation)[:, None, None]
    grid_x = cols[None, None, :] + (taps % kernel * dilation)[:, None, None]
    return grid_y + off[:, :, :, 0], grid_x + off[:, :, :, 1]


def _assert_close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------
# DeformConv
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
def test_deform_conv_matches_mmcv_reference(stride, dilation):
    """Random offsets of up to 3 px, many samples partly or fully outside the 11x13 image."""
    gen = _gen(10 * stride + dilation)
    conv = DeformConv(3, 5, kernel_size=3, stride=stride, padding=dilation, dilation=dilation)
    conv = conv.double()
    x = torch.randn(2, 3, 11, 13, generator=gen, dtype=torch.float64)
    h_out = (11 + 2 * dilation - 2 * dilation - 1) // stride + 1
    w_out = (13 + 2 * dilation - 2 * dilation - 1) // stride + 1
    offset = (torch.rand(2, 18, h_out, w_out, generator=gen, dtype=torch.float64) * 2 - 1) * 3

    # The case really covers out-of-image samples: some fully outside (no neighbour inside),
    # some partly outside (between -1 and 0 or between the last row/column and one past it).
    pos_y, pos_x = _sample_positions(offset, 11, 13, 3, stride, dilation, dilation)
    assert ((pos_y <= -1) | (pos_y >= 11) | (pos_x <= -1) | (pos_x >= 13)).any()
    assert (((pos_y > -1) & (pos_y < 0)) | ((pos_y > 10) & (pos_y < 11))).any()
    assert (((pos_x > -1) & (pos_x < 0)) | ((pos_x > 12) & (pos_x < 13))).any()

    out = conv(x, offset)
    ref = mmcv_deform_conv2d(
        x, offset, conv.weight.detach(), stride=stride, padding=dilation, dilation=dilation
    )
    assert out.shape == (2, 5, h_out, w_out)
    _assert_close(out, ref, F64_TOL)  # float64, 1e-10


def test_deform_conv_deform_groups_match_mmcv_reference():
    """Two offset groups (channels 0-1 and 2-3 sample at their own positions), float64."""
    gen = _gen(1)
    conv = DeformConv(4, 3, kernel_size=3, padding=1).double()
    x = torch.randn(1, 4, 6, 7, generator=gen, dtype=torch.float64)
    offset = (torch.rand(1, 36, 6, 7, generator=gen, dtype=torch.float64) * 2 - 1) * 2
    ref = mmcv_deform_conv2d(x, offset, conv.weight.detach(), padding=1, deform_groups=2)
    _assert_close(conv(x, offset), ref, F64_TOL)  # float64, 1e-10


def test_deform_conv_grouped_matches_per_group_reference():
    """``groups=2`` (ResNeXt): each half of the channels convolved with its half of the
    weight at the same sampling positions, float64 (1e-10)."""
    gen = _gen(2)
    conv = DeformConv(4, 6, kernel_size=3, padding=1, groups=2).double()
    assert conv.weight.shape == (6, 2, 3, 3)
    x = torch.randn(1, 4, 6, 7, generator=gen, dtype=torch.float64)
    offset = (torch.rand(1, 18, 6, 7, generator=gen, dtype=torch.float64) * 2 - 1) * 2
    w = conv.weight.detach()
    ref = torch.cat(
        [
            mmcv_deform_conv2d(x[:, :2], offset, w[:3], padding=1),
            mmcv_deform_conv2d(x[:, 2:], offset, w[3:], padding=1),
        ],
        dim=1,
    )
    _assert_close(conv(x, offset), ref, F64_TOL)


def test_deform_conv_mask_weights_each_tap():
    """Modulated (DCNv2): the output is ``sum_t mask_t * (contribution of tap t alone)``,
    each contribution computed by the reference with the other taps' weights zeroed."""
    gen = _gen(3)
    conv = DeformConv(2, 3, kernel_size=3, padding=1).double()
    x = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64)
    offset = (torch.rand(1, 18, 5, 6, generator=gen, dtype=torch.float64) * 2 - 1) * 2
    mask = torch.rand(1, 9, 5, 6, generator=gen, dtype=torch.float64)
    w = conv.weight.detach()
    ref = torch.zeros(1, 3, 5, 6, dtype=torch.float64)
    for tap in range(9):
        keep = torch.zeros(9, dtype=torch.float64)
        keep[tap] = 1
        w_tap = w * keep.reshape(1, 1, 3, 3)
        ref = ref + mask[:, tap : tap + 1] * mmcv_deform_conv2d(x, offset, w_tap, padding=1)
    _assert_close(conv(x, offset, mask), ref, F64_TOL)  # float64, 1e-10


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_deform_conv_zero_offsets_equal_conv2d(stride, dilation):
    gen = _gen(4)
    conv = DeformConv(3, 4, kernel_size=3, stride=stride, padding=dilation, dilation=dilation)
    conv = conv.double()
    x = torch.randn(2, 3, 11, 13, generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, conv.weight.detach(), stride=stride, padding=dilation, dilation=dilation)
    offset = torch.zeros(2, 18, *expected.shape[-2:], dtype=torch.float64)
    _assert_close(conv(x, offset), expected, F64_TOL)  # float64, 1e-10


def test_deform_conv_applies_norm():
    """With a norm, the output is the norm of the plain deformable convolution."""
    gen = _gen(5)
    norm = nn.BatchNorm2d(3).double().eval()
    norm.running_mean.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    norm.running_var.copy_(torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)
    conv = DeformConv(2, 3, kernel_size=3, padding=1, norm=norm).double()
    x = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64)
    offset = torch.randn(1, 18, 5, 6, generator=gen, dtype=torch.float64)
    raw = mmcv_deform_conv2d(x, offset, conv.weight.detach(), padding=1)
    expected = (raw - norm.running_mean[:, None, None]) / torch.sqrt(
        norm.running_var[:, None, None] + BN_EPS
    )
    _assert_close(conv(x, offset), expected, F64_TOL)  # float64, 1e-10


def _off_grid_offsets(shape, gen, reach=1):
    """Offsets whose fractional part lies in [0.2, 0.8]: every sample is strictly between
    pixel rows and columns (bilinear sampling is smooth there), at most ``reach + 1`` px away."""
    whole = torch.randint(-reach, reach + 1, shape, generator=gen).double()
    frac = 0.2 + 0.6 * torch.rand(shape, generator=gen, dtype=torch.float64)
    return whole + frac


def test_deform_conv_gradcheck_cpu():
    """Numerical vs analytic gradients w.r.t. input, offset and weight (float64, CPU)."""
    gen = _gen(6)
    conv = DeformConv(2, 2, kernel_size=3, padding=1).double()
    x = torch.randn(1, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    offset = _off_grid_offsets((1, 18, 5, 5), gen).requires_grad_()
    weight = conv.weight.detach().clone().requires_grad_()

    def run(x, offset, weight):
        return torch.func.functional_call(conv, {"weight": weight}, (x, offset))

    assert torch.autograd.gradcheck(run, (x, offset, weight), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_deform_conv_gradients_match_mmcv_reference():
    """Autograd through ``DeformConv`` equals autograd through the reference (float64,
    1e-10), with stride 2, dilation 2 and samples outside the image."""
    gen = _gen(7)
    conv = DeformConv(2, 3, kernel_size=3, stride=2, padding=2, dilation=2).double()
    x = torch.randn(1, 2, 7, 8, generator=gen, dtype=torch.float64)
    offset = _off_grid_offsets((1, 18, 4, 4), gen, reach=2)
    grad_out = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, offset, conv.weight)]
        (fn(*leaves) * grad_out).sum().backward()
        return [t.grad for t in leaves]

    ours = grads(lambda x, off, w: torch.func.functional_call(conv, {"weight": w}, (x, off)))
    ref = grads(lambda x, off, w: mmcv_deform_conv2d(x, off, w, 2, 2, 2))
    for name, a, b in zip(("input", "offset", "weight"), ours, ref):
        assert a.abs().max() > 0, name
        _assert_close(a, b, F64_TOL)


# --------------------------------------------------------------------------------------
# DeformBottleneckBlock
# --------------------------------------------------------------------------------------


def _block_kwargs(norm="FrozenBN", stride_in_1x1=False, dilation=1, modulated=False):
    """The keyword arguments ``ResNet.make_stage`` passes for the first block of a deformable
    stage built by ``build_knet_resnet_backbone`` (stride 2, 8 -> 16 channels)."""
    return dict(
        bottleneck_channels=4,
        stride=2,
        num_groups=1,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        dilation=dilation,
        deform_modulated=modulated,
        deform_num_groups=1,
    )


def _randomize_norms(block: nn.Module, gen: torch.Generator) -> None:
    """Random affine parameters and running statistics in every (frozen) batch norm."""
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
@pytest.mark.parametrize("modulated", [False, True])
def test_block_state_dict_matches_detectron2(norm, modulated):
    """Same keys and shapes as Detectron2's own block, so checkpoints interchange."""
    kwargs = _block_kwargs(norm=norm, modulated=modulated)
    ours = DeformBottleneckBlock(8, 16, **kwargs).state_dict()
    theirs = D2DeformBottleneckBlock(8, 16, **kwargs).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ours["conv2.weight"].shape == (4, 4, 3, 3)
    assert ours["conv2_offset.weight"].shape == ((27 if modulated else 18), 4, 3, 3)
    # ... and the block loads Detectron2's weights (strict).
    DeformBottleneckBlock(8, 16, **kwargs).load_state_dict(theirs)


def test_block_from_make_stage():
    """Built the way ``build_knet_resnet_backbone`` builds a deformable stage."""
    blocks = ResNet.make_stage(
        DeformBottleneckBlock,
        2,
        in_channels=8,
        out_channels=16,
        bottleneck_channels=4,
        stride_per_block=[2, 1],
        dilation_per_block=[1, 1],
        norm="FrozenBN",
        stride_in_1x1=False,
        num_groups=1,
        deform_modulated=False,
        deform_num_groups=1,
    )
    assert all(isinstance(b, DeformBottleneckBlock) for b in blocks)
    assert isinstance(blocks[0].conv2, DeformConv) and isinstance(blocks[1].conv2, DeformConv)
    assert blocks[0].conv2.stride == (2, 2) and blocks[0].conv2_offset.stride == (2, 2)
    assert blocks[1].shortcut is None
    with torch.no_grad():
        out = nn.Sequential(*blocks)(torch.randn(1, 8, 9, 11, generator=_gen(8)))
    assert out.shape == (1, 16, 5, 6)


@pytest.mark.parametrize(
    "stride_in_1x1, dilation, norm", [(False, 1, "FrozenBN"), (True, 1, "BN"), (False, 2, "BN")]
)
def test_fresh_block_equals_plain_bottleneck(stride_in_1x1, dilation, norm):
    """The offset conv starts at zero, so a new block is Detectron2's plain bottleneck with the
    same weights (float64, 1e-10)."""
    kwargs = _block_kwargs(norm=norm, stride_in_1x1=stride_in_1x1, dilation=dilation)
    torch.manual_seed(9)
    block = DeformBottleneckBlock(8, 16, **kwargs)
    assert torch.count_nonzero(block.conv2_offset.weight) == 0
    assert torch.count_nonzero(block.conv2_offset.bias) == 0
    assert block.conv2.weight.abs().max() > 0
    conv2_stride = (1, 1) if stride_in_1x1 else (2, 2)
    assert block.conv2.stride == conv2_stride == block.conv2_offset.stride
    assert block.conv2.padding == (dilation, dilation) == block.conv2.dilation
    _randomize_norms(block, _gen(9))  # the offset conv stays zero
    block = block.double().eval()

    plain_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("deform_")}
    plain = BottleneckBlock(8, 16, **plain_kwargs).double().eval()
    sd = {k: v for k, v in block.state_dict().items() if not k.startswith("conv2_offset.")}
    plain.load_state_dict(sd)

    x = torch.randn(2, 8, 9, 11, generator=_gen(10), dtype=torch.float64)
    with torch.no_grad():
        _assert_close(block(x), plain(x), F64_TOL)  # float64, 1e-10


@pytest.mark.parametrize(
    "stride_in_1x1, dilation, norm", [(False, 1, "FrozenBN"), (True, 1, "BN"), (False, 2, "BN")]
)
def test_block_matches_functional_reference(stride_in_1x1, dilation, norm):
    """Eval mode, non-zero offset conv: offsets of a few pixels, float64 (1e-10)."""
    gen = _gen(11)
    torch.manual_seed(11)
    kwargs = _block_kwargs(norm=norm, stride_in_1x1=stride_in_1x1, dilation=dilation)
    block = DeformBottleneckBlock(8, 16, **kwargs)
    _randomize_norms(block, gen)
    with torch.no_grad():
        block.conv2_offset.weight.copy_(torch.randn(18, 4, 3, 3, generator=gen) * 0.4)
        block.conv2_offset.bias.copy_(torch.randn(18, generator=gen) * 0.5)
    block = block.double().eval()
    sd = block.state_dict()

    x = torch.randn(2, 8, 9, 11, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
    ref, offset = detectron2_deform_bottleneck(sd, x, 2, stride_in_1x1, dilation)
    assert offset.abs().max() > 1.5  # offsets of a few pixels, not a near-regular grid
    assert out.shape == ref.shape == (2, 16, 5, 6)
    _assert_close(out, ref, F64_TOL)  # float64, 1e-10


def test_block_backward_cpu():
    """Training on CPU: the offset conv gets a gradient once the offsets are non-zero."""
    torch.manual_seed(12)
    block = DeformBottleneckBlock(8, 16, **_block_kwargs(norm="BN"))
    x = torch.randn(2, 8, 9, 11, generator=_gen(12))
    block(x).square().sum().backward()
    # With zero offsets the offset conv already receives gradients (through bilinear weights).
    for name, param in block.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert block.conv2_offset.weight.grad.abs().max() > 0


# --------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------


@pytest.fixture
def no_tf32(monkeypatch):
    """Full float32 convolutions and matmuls on the GPU (TF32 would lose ~1e-3)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(no_tf32):
    """DeformConv (forward and backward) and the block (eval) on the GPU equal the CPU result
    (float32, 1e-5)."""
    gen = _gen(13)
    conv = DeformConv(3, 4, kernel_size=3, stride=2, padding=2, dilation=2)
    x = torch.randn(2, 3, 11, 13, generator=gen)
    offset = _off_grid_offsets((2, 18, 6, 7), gen, reach=2).float()
    grad_out = torch.randn(2, 4, 6, 7, generator=gen)

    def run(device):
        module = conv.to(device)
        module.zero_grad()
        leaves = [t.detach().to(device).requires_grad_() for t in (x, offset)]
        out = module(*leaves)
        (out * grad_out.to(device)).sum().backward()
        grads = [t.grad.cpu() for t in leaves] + [module.weight.grad.cpu()]
        return out.detach().cpu(), grads

    out_cpu, grads_cpu = run("cpu")
    out_gpu, grads_gpu = run("cuda")
    conv.to("cpu")
    _assert_close(out_gpu, out_cpu, F32_TOL)
    for a, b in zip(grads_gpu, grads_cpu):
        _assert_close(a, b, F32_TOL)

    torch.manual_seed(13)
    block = DeformBottleneckBlock(8, 16, **_block_kwargs(norm="BN"))
    _randomize_norms(block, gen)
    with torch.no_grad():
        block.conv2_offset.weight.copy_(torch.randn(18, 4, 3, 3, generator=gen) * 0.4)
    block.eval()
    xb = torch.randn(2, 8, 9, 11, generator=gen)
    with torch.no_grad():
        expected = block(xb)
        actual = block.cuda()(xb.cuda()).cpu()
    _assert_close(actual, expected, F32_TOL)
