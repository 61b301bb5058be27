"""Tools for models with BatchNorm layers: one tool a file, each a module walker."""
from .adapt import adapt
from .convert import convert
from .fold import fold, fold_weights
from .fuse import FuseReport, fuse
from .freeze import freeze, is_frozen, unfreeze
from .keras import from_keras, to_keras
from .memory import saved_bytes
from .recalibrate import recalibrate
from .doctor import diagnose

__all__ = ["convert", "freeze", "unfreeze", "is_frozen", "fold", "fold_weights", "fuse", "FuseReport", "recalibrate", "adapt", "saved_bytes",
           "from_keras", "to_keras", "diagnose"]
