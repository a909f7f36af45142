"""Pretraining methods, one file each, registered by name (`@register("mae")`, `METHODS`).

The contract every method implements is `train.methods.base.Method`: a `Config` dataclass,
`forward(batch, step) -> (loss, report)`, an `encoder`, and the optional hooks with their defaults.
Importing this package imports (and so registers) every method.
"""

from train.methods import classify, digpt, dino, hpm, mae, mapet, mlo_mae, moco_v3, simclr  # noqa: F401 (registers)
from train.methods.base import METHODS, Method, build_method, method_class, register

__all__ = ["METHODS", "Method", "build_method", "method_class", "register"]
