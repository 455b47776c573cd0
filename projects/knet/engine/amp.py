"""Mixed-precision training (``SOLVER.AMP.ENABLED``) on CUDA and on CPU.

``SOLVER.AMP.DTYPE`` chooses the autocast type: "float16", "bfloat16" or "auto" (the default:
float16 on CUDA, bfloat16 on CPU). float16 on CUDA runs Detectron2's ``AMPTrainer`` (autocast +
``GradScaler``); bfloat16 (CUDA or CPU) runs :class:`AutocastTrainer`, the same step without a
grad scaler (bfloat16 has fp32's exponent range, so gradients do not underflow), which Detectron2
v0.6's ``AMPTrainer`` cannot do (it asserts CUDA and has no dtype argument). float16 on CPU is
refused: CPU autocast's float16 coverage is partial and would need a CPU grad scaler. Whatever the
dtype, K-Net keeps the group-feature sums, the matching costs and the losses in fp32 (see
``knet.modeling.criterion.numerics`` and the kernel heads).
"""

import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(cfg) -> torch.dtype:
    """The autocast dtype of ``SOLVER.AMP.DTYPE`` on ``MODEL.DEVICE``.

    Raises:
        ValueError: an unknown name, or float16 on a device other than CUDA.
    """
    name = cfg.SOLVER.AMP.get("DTYPE", "auto")
    device_type = torch.device(cfg.MODEL.DEVICE).type
    if name == "auto":
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if name not in AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.DTYPE={name!r}: expected 'auto', {' or '.join(AMP_DTYPES)}")
    if AMP_DTYPES[name] == torch.float16 and device_type != "cuda":
        raise ValueError(
            f"SOLVER.AMP.DTYPE=float16 needs CUDA (MODEL.DEVICE={cfg.MODEL.DEVICE!r}); use "
            "'bfloat16' (or 'auto') for mixed precision on the CPU"
        )
    return AMP_DTYPES[name]


class AutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass and loss sum run under ``torch.autocast``.

    The backward pass runs outside autocast, as PyTorch recommends; the gradients reach the fp32
    parameters in fp32. Upstream ``SimpleTrainer`` options (``zero_grad_before_forward``,
    ``after_backward``, ``async_write_metrics``) are honoured when present, so this works with
    Detectron2 v0.6 and upstream.
    """

    def __init__(self, model, data_loader, optimizer, *, device_type: str, dtype=torch.bfloat16):
        super().__init__(model, data_loader, optimizer)
        self.device_type = device_type
        self.dtype = dtype

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        zero_grad_first = getattr(self, "zero_grad_before_forward", False)
        if zero_grad_first:
            self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not zero_grad_first:
            self.optimizer.zero_grad()
        losses.backward()
        if callable(getattr(self, "after_backward", None)):  # upstream hook, absent in v0.6
            self.after_backward()
        if getattr(self, "async_write_metrics", False):
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_amp_trainer(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """The mixed-precision step runner that ``KNetTrainer`` uses for ``cfg``."""
    dtype = amp_dtype(cfg)
    device_type = torch.device(cfg.MODEL.DEVICE).type
    if device_type == "cuda" and dtype == torch.float16:
        return AMPTrainer(model, data_loader, optimizer)
    return AutocastTrainer(model, data_loader, optimizer, device_type=device_type, dtype=dtype)
