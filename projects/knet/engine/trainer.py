"""``KNetTrainer``: Detectron2's ``DefaultTrainer`` with K-Net's data, evaluation and solver."""

import logging
import os
import weakref
from collections import OrderedDict

from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.hooks import EvalHook
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import JSONWriter
from detectron2.utils.logger import setup_logger

from ..checkpoint import KNetCheckpointer
from ..data.kinds import (
    build_test_mapper,
    build_train_mapper,
    class_layout,
    kind_of,
    model_description,
)
from ..evaluation import (
    build_evaluator,
    check_evaluation_dataset_once,
    check_training_datasets_once,
)
from ..modeling import SemanticKNet
from .amp import build_amp_trainer
from .dataset_config import configured_for_datasets
from .launch import create_ddp_model
from .preemption import ClosableLoader, PreemptionCheckpointer
from .seeded_loader import SeededTrainLoader, iteration_seed
from .solver import build_optimizer
from .tta import SemanticSegmentorWithTTA


def check_global_batch(ims_per_batch: int, world_size: int) -> None:
    """Raise ``ValueError`` when the global batch cannot be shared evenly by the processes:
    each takes ``ims_per_batch / world_size`` images, so that the global batch, hence the
    recipe, does not depend on their number."""
    if ims_per_batch % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({ims_per_batch}) is the global batch and must be divisible "
            f"by the number of processes ({world_size}); change one of them"
        )


def check_periodic_evaluation(cfg: CfgNode, world_size: int) -> None:
    """Raise ``ValueError`` before training when a periodic evaluation would fail hours in: a
    video dataset is evaluated video by video, frames in order, in one process."""
    kinds = {name: kind_of(name) for name in cfg.DATASETS.TEST}
    videos = [name for name, kind in kinds.items() if kind and class_layout(kind) != kind]
    if world_size > 1 and cfg.TEST.EVAL_PERIOD > 0 and videos:
        raise ValueError(
            f"TEST.EVAL_PERIOD {cfg.TEST.EVAL_PERIOD} would evaluate the video dataset(s) "
            f"{videos} in {world_size} processes, but tracking needs each video's frames in order "
            "in one process: set TEST.EVAL_PERIOD 0 and evaluate after training with one "
            "process (train_net.py --eval-only)"
        )


class KNetTrainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with K-Net's dataset mappers, evaluators and optimizer, mixed
    precision on CUDA and CPU (:mod:`knet.engine.amp`), and checkpoints (written atomically) that
    hold the optimizer and AMP grad scaler states too, so that ``--resume`` continues the run."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__ (the same in Detectron2 v0.6 and upstream), except for the DDP
        # wrapper (Detectron2's passes device_ids, which DDP rejects for CPU / gloo training),
        # the step runner (its AMPTrainer is CUDA float16 only: SOLVER.AMP picks one, see
        # knet.engine.amp) and the checkpointer (knet.checkpoint). DefaultTrainer.__init__ would
        # build its own, so the base class initialised here is TrainerBase.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        # class counts / outputs checked against the datasets before anything is built
        # (knet.engine.dataset_config; -1 class counts are taken from the training dataset)
        cfg = configured_for_datasets(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        check_global_batch(cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size())
        check_periodic_evaluation(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = build_amp_trainer(cfg, model, data_loader, optimizer)
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = KNetCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            allow_partial=cfg.MODEL.WEIGHTS_PARTIAL,
            metadata=model_description(cfg),  # checkpoints describe their model
            trainer=weakref.proxy(self),
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        # SIGTERM / SIGINT write a checkpoint before exiting (knet.engine.preemption): after the
        # LR scheduler and periodic checkpoint hooks, before the first evaluation hook
        hooks = super().build_hooks()
        at = next((i for i, h in enumerate(hooks) if isinstance(h, EvalHook)), len(hooks))
        return hooks[:at] + [PreemptionCheckpointer(self.checkpointer)] + hooks[at:]

    def state_dict(self):
        state = super().state_dict()
        # Detectron2 v0.6 leaves out the optimizer / grad scaler; upstream stores them here too
        state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_train_loader(cls, cfg):
        """With ``SEED >= 0`` and Detectron2's default sampler, batches are a function of (seed,
        iteration), for exact ``--resume``; closable, for the preemption hook. The training sets
        are checked first (``DATASETS.CHECK_GT``, ``knet.evaluation.ground_truth``), so that a bad
        file fails now, listed with all others, not hours in."""
        check_training_datasets_once(cfg)
        mapper = build_train_mapper(cfg)
        if cfg.SEED >= 0 and cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler":
            return ClosableLoader(SeededTrainLoader(cfg, mapper))
        return ClosableLoader(build_detection_train_loader(cfg, mapper=mapper))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with K-Net's test mapper, after a check of the dataset's ground
        truth (``DATASETS.CHECK_GT``, once per process): a bad file fails before inference."""
        check_evaluation_dataset_once(cfg, dataset_name)
        return build_detection_test_loader(cfg, dataset_name, mapper=build_test_mapper(cfg))

    def build_writers(self):
        # metrics.json gets each logged iteration's own values, not a median over the last 20
        # (whose window a resumed run cannot restore); the console keeps the smoothed values
        writers = super().build_writers()
        for i, writer in enumerate(writers):
            if isinstance(writer, JSONWriter):
                writer.close()
                writers[i] = JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), 1)
        return writers

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume)
        loader = getattr(self.data_loader, "loader", None)  # inside the ClosableLoader
        if isinstance(loader, SeededTrainLoader):
            loader.start_iter = self.start_iter

    def run_step(self):
        # with a seed, the step's randomness (drop path, dropout) depends on the iteration only
        if self.cfg.SEED >= 0:
            seed_all_rng(iteration_seed(self.cfg.SEED, self.iter, -1))
        super().run_step()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate with ``TEST.AUG`` (multi-scale + flip); semantic K-Net only."""
        if not isinstance(getattr(model, "module", model), SemanticKNet):
            raise ValueError(
                "TEST.AUG is implemented for semantic K-Net (sem_seg outputs) only; "
                "set TEST.AUG.ENABLED False for instance/panoptic models"
            )
        logging.getLogger("knet").info("Running inference with test-time augmentation ...")
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
            )
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, SemanticSegmentorWithTTA(cfg, model), evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in results.items())
