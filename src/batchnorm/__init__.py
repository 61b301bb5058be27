"""batchnorm: Batch Normalization for PyTorch, written from scratch.

Drop-in `BatchNorm1d/2d/3d` (subclasses of torch's, with our own forward and hand-derived
backward), the pure functions behind them in `batchnorm.functional`, and the tools BN users keep
rewriting: `freeze`/`unfreeze` and `convert`. `BatchNormAct1d/2d/3d` fuse BN with an activation
(and can save memory in place); on the CPU, float32/float64 tensors run on Numba kernels. For
scale and deployment (docs/scale.md): `SyncBatchNorm` on any torch.distributed backend, `fold` for
inference, `recalibrate` for exact running statistics, `adapt` for test-time adaptation to shifted
data, and the small-batch layers `GhostBatchNorm*d` and `BatchRenorm*d`. Beyond torch (docs/tools.md):
`from_keras`/`to_keras` move BN layers to and from Keras 3, `diagnose` (the `batchnorm doctor`
command) checks a model's BN state, `batchnorm.func` is a pure functional BN that returns its
statistics (vmap over a stack of models in training), and `fuse` rewrites a model (torch.fx) so that
each BN runs with the activation and residual add after it as one `BatchNormAct*d` layer.
"""
from . import func, functional
from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .tools import adapt, convert, diagnose, fold, fold_weights, freeze, fuse, from_keras, is_frozen, recalibrate, to_keras, unfreeze
from .sync import SyncBatchNorm
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__version__ = "0.1.0"

__all__ = [
    "functional",
    "func",
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
    "SyncBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "fold",
    "fold_weights",
    "fuse",
    "recalibrate",
    "from_keras",
    "to_keras",
    "diagnose",
    "adapt",
]
