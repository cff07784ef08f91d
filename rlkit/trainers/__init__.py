"""Trainers, one module per method; each is a TRL config + a trainer class + a ``METHOD`` entry in
``rlkit.trainers.registry``. ``RLKitGRPOTrainer`` (``rlkit.trainers.grpo``) is the base that the
RL methods extend."""

from .registry import get_method, method_names, register_method

__all__ = ["get_method", "method_names", "register_method"]
