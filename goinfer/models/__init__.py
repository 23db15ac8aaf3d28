"""The user's model API (`Model`), the built-in Echo model, and model registration."""

from goinfer.models.base import Model
from goinfer.models.registry import ModelError, ModelRegistry, register

__all__ = ["Model", "ModelError", "ModelRegistry", "register"]
