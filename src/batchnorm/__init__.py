"""batchnorm: Batch Normalization for PyTorch, written from scratch.

Drop-in `BatchNorm1d/2d/3d` (subclasses of torch's, with our own forward and hand-derived
backward), the pure functions behind them in `batchnorm.functional`, and the tools BN users keep
rewriting: `freeze`/`unfreeze` and `convert`. `BatchNormAct1d/2d/3d` fuse BN with an activation
(and can save memory in place); on the CPU, float32/float64 tensors run on Numba kernels.
"""
from . import functional
from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .tools import convert, freeze, is_frozen, unfreeze

__version__ = "0.1.0"

__all__ = [
    "functional",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "convert",
    "freeze",
    "unfreeze",
    "is_frozen",
]
