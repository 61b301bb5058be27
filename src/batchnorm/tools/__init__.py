"""Tools for models with BatchNorm layers: one tool a file, each a module walker."""
from .convert import convert
from .freeze import freeze, is_frozen, unfreeze

__all__ = ["convert", "freeze", "unfreeze", "is_frozen"]
