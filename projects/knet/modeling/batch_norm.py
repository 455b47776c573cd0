"""Batch normalisation with statistics shared by all processes, on any device and backend.

Detectron2's "SyncBN" is ``torch.nn.SyncBatchNorm``, which refuses CPU tensors (gloo), and
Detectron2's ``NaiveSyncBatchNorm`` keeps the biased variance in ``running_var`` and never counts
``num_batches_tracked``, so its buffers are not those of one process. :class:`GlobalBatchNorm2d`
computes the statistics of the global batch and updates the buffers exactly as
``nn.BatchNorm2d`` does in one process over that batch: the whole state dict agrees with a
one-process run up to rounding.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from detectron2.utils import comm
from torch import nn

__all__ = ["GlobalBatchNorm2d", "share_cpu_batch_statistics"]


class _GlobalBatchBN(torch.autograd.Function):
    """BN in training over the global batch when every process holds an equal share (the same
    shape): the outputs and running buffers are those of ``nn.BatchNorm2d`` over the gathered
    batch, the very same kernel on the very same tensor as in one process (so bit for bit with
    the same number of threads). This matters more than it seems: K-Net's hard mask threshold
    (``sigmoid > 0.5``) turns a last-bit difference of the features into a different pixel set
    and a gradient several percent apart. The backward is BN's with the two per-channel sums
    all-reduced (as ``nn.SyncBatchNorm``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        rank, world = dist.get_rank(), dist.get_world_size()
        # gather channels-last activations as (B, H, W, C) blocks, so that the batch has the
        # memory layout one process would have (BN's reduction order depends on it)
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        local = x.permute(0, 2, 3, 1).contiguous() if nhwc else x.contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        batch = torch.cat(parts)
        batch = batch.permute(0, 3, 1, 2) if nhwc else batch
        y, mean, invstd = torch.native_batch_norm(
            batch, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = batch.numel() // batch.shape[1]
        b = x.shape[0]
        # a copy, not a view: the callers' in-place ReLU may not modify a view of y
        return y[rank * b : (rank + 1) * b].clone()

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        dy, xf = dy.float(), x.float()
        x_hat = (xf - mean.view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)
        sums = torch.cat([dy.sum((0, 2, 3)), (dy * x_hat).sum((0, 2, 3))])
        grad_weight, grad_bias = sums[c:].clone(), sums[:c].clone()  # this process's share
        dist.all_reduce(sums)
        mean_dy, mean_dy_xhat = (sums / ctx.count).view(2, 1, c, 1, 1)
        scale = invstd if weight is None else invstd * weight
        dx = scale.view(1, c, 1, 1) * (dy - mean_dy - x_hat * mean_dy_xhat)
        if weight is None:
            grad_weight = grad_bias = None
        return dx.to(x.dtype), grad_weight, grad_bias, None, None, None, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of every process's batch together.

    In training with several processes: when all hold the same shape (equal shares of a batch
    padded to one size), the outputs and buffers are ``nn.BatchNorm2d``'s over the gathered
    global batch (:class:`_GlobalBatchBN`, one all-gather of the activations per layer).
    Otherwise: mean and (biased) variance over the N = B * H * W values of each channel on all
    processes (two differentiable all-reduces: the sums and counts, then the squared deviations
    from the global mean, which keeps the variance exact where E[x^2] - E[x]^2 would cancel),
    ``running_var`` updated with the unbiased N / (N - 1) variance; equal up to rounding. Both
    count ``num_batches_tracked`` as ``nn.BatchNorm2d`` does. In one process, or in eval mode,
    this is ``nn.BatchNorm2d`` itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if not self.training or comm.get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        shapes = [torch.zeros(4, dtype=torch.int64) for _ in range(comm.get_world_size())]
        dist.all_gather(shapes, torch.tensor(x.shape))
        if all(torch.equal(s, shapes[0]) for s in shapes):
            return _GlobalBatchBN.apply(
                x, self.weight, self.bias, self.running_mean, self.running_var, factor, self.eps
            )
        return self._forward_unequal_shares(x, factor)

    def _forward_unequal_shares(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # half precision is not enough for the sums
        c = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() / c)])
        total = dist_fn.all_reduce(local)
        n = total[c].detach()
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n:g}")
        mean = total[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = dist_fn.all_reduce(centred.square().sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var * (n / (n - 1)), alpha=factor)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        y = centred * scale.view(1, c, 1, 1)
        if self.affine:
            y = y + self.bias.view(1, c, 1, 1)
        return y.to(dtype)


def share_cpu_batch_statistics(module: nn.Module) -> nn.Module:
    """``module`` with each ``nn.SyncBatchNorm`` on the CPU replaced by a
    :class:`GlobalBatchNorm2d` holding the same parameters and buffers (the same tensors, so an
    optimizer built before keeps working). On GPUs ``nn.SyncBatchNorm`` is kept: it computes
    the same statistics and buffers. Call it in each process of a distributed run."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if isinstance(module, nn.SyncBatchNorm) and all(t.device.type == "cpu" for t in tensors):
        if module.process_group not in (None, dist.group.WORLD):
            raise ValueError("SyncBatchNorm over a process sub-group is not supported on the CPU")
        shared = GlobalBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            shared.weight, shared.bias = module.weight, module.bias
        shared.running_mean, shared.running_var = module.running_mean, module.running_var
        shared.num_batches_tracked = module.num_batches_tracked
        shared.train(module.training)
        return shared
    for name, child in module.named_children():
        converted = share_cpu_batch_statistics(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
