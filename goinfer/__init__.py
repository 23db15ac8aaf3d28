"""goinfer: serve deep-learning models behind a signed HTTP API, with Redis between the tiers.

The public face is small: subclass `Model`, raise `ApiError` to answer with your own code, and
`register` your classes when you build your own click program around goinfer's commands.
"""

from goinfer.errors import ApiError
from goinfer.models.base import Model
from goinfer.models.registry import register

__version__ = "0.1.0"

__all__ = ["ApiError", "Model", "register", "__version__"]
