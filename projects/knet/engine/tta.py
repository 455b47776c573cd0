"""Test-time augmentation (multi-scale and horizontal flip) for semantic K-Net."""

import torch
from detectron2.data.transforms import HFlipTransform
from detectron2.modeling import DatasetMapperTTA
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class SemanticSegmentorWithTTA(nn.Module):
    """Averages the ``sem_seg`` probabilities of a model over ``TEST.AUG`` inputs.

    Every input is resized to each of ``TEST.AUG.MIN_SIZES`` (long side <= ``TEST.AUG.MAX_SIZE``)
    and, with ``TEST.AUG.FLIP``, also flipped (Detectron2's ``DatasetMapperTTA``). The model
    returns probabilities at the original size, so flipped outputs are flipped back and all are
    averaged, as MMSeg's ``aug_test`` does.
    """

    def __init__(self, cfg, model: nn.Module, tta_mapper=None, batch_size: int = 1):
        """``model`` returns ``[{"sem_seg": (K, H, W)}]`` at the inputs' height/width;
        ``tta_mapper`` maps one input dict to augmented dicts with a "transforms" entry (default
        ``DatasetMapperTTA(cfg)``); ``batch_size`` augmented images go in one forward pass."""
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.cfg = cfg.clone()
        self.model = model
        self.tta_mapper = tta_mapper or DatasetMapperTTA(cfg)
        self.batch_size = batch_size

    def __call__(self, batched_inputs: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Same input and output format as the model's inference."""
        return [self._inference_one_image(x) for x in batched_inputs]

    def _inference_one_image(self, inputs: dict) -> dict[str, torch.Tensor]:
        height, width = inputs["image"].shape[1:3]
        augmented = self.tta_mapper({"height": height, "width": width, **inputs})
        total: torch.Tensor | None = None
        for start in range(0, len(augmented), self.batch_size):
            batch = augmented[start : start + self.batch_size]
            with torch.no_grad():
                outputs = self.model(batch)
            for x, out in zip(batch, outputs):
                probs = out["sem_seg"]
                if any(isinstance(t, HFlipTransform) for t in x["transforms"].transforms):
                    probs = probs.flip(dims=[2])
                total = probs.clone() if total is None else total.add_(probs)
        return {"sem_seg": total / len(augmented)}
