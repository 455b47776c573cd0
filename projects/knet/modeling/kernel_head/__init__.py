from .initial_kernel_head import ConvKernelHead
from .iterative_head import KERNEL_HEAD_REGISTRY, KNetIterativeKernelHead, build_kernel_head
from .kernel_update_head import KernelUpdateHead
from .kernel_updator import KernelUpdator
from .semantic_head import KNetSemanticKernelHead
