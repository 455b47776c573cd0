"""Training losses of K-Net: the Hungarian-matched set criterion of instance/panoptic K-Net and
the cross-entropy criterion of semantic K-Net, with their loss functions and matcher."""

from .matcher import HungarianMatcher
from .semantic_criterion import KNetSemanticCriterion
from .set_criterion import KNetCriterion, all_reduce_mean

__all__ = ["HungarianMatcher", "KNetCriterion", "KNetSemanticCriterion", "all_reduce_mean"]
