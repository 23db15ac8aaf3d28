"""Which models a process serves: classes registered in code plus the settings' `Models:` list.

Processes receive models as import paths ("package.module:Class"), never as pickled classes,
so a spawned worker imports exactly what its parent named and nothing runs twice by accident.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Iterable, Mapping

from goinfer.models.base import NOAPI_PREFIX, Model
from goinfer.models.versions import ServedVersion


class ModelError(Exception):
    """A model class that cannot be served; the message names the class and what is wrong."""


# Set on the class `import_model` makes for "package.module:Class@/api/path": how to name it again.
TARGET_ATTRIBUTE = "goinfer_target"


def import_path_of(cls: type) -> str:
    """The "module:QualName" path (or "module:QualName@/api/path" target) a spawned process can
    import the class from."""
    target = cls.__dict__.get(TARGET_ATTRIBUTE)
    return target if isinstance(target, str) else f"{cls.__module__}:{cls.__qualname__}"


def import_model(target: str) -> type[Model]:
    """Import "package.module:Class", checking that it is a servable Model.

    "package.module:Class@/api/path" serves the class under that path: a subclass is made for
    it, so one class (a model served from files) can be listed several times with its own files.
    """
    path, at, api_path = target.partition("@")
    found = _import_object(path)
    if not at:
        return check_model_class(found, path)
    if not (inspect.isclass(found) and issubclass(found, Model)):
        raise ModelError(f"{path}: not a subclass of goinfer.Model")
    served = type(found.__name__, (found,), {"api_path": api_path, TARGET_ATTRIBUTE: target,
                                             "__module__": found.__module__, "__qualname__": found.__qualname__})
    return check_model_class(served, target)


def _import_object(path: str) -> object:
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise ModelError(f"{path!r}: expected 'package.module:ClassName'")
    _import_from_working_directory()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is reported, not raised
        raise ModelError(f"{path!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    target: object = module
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ModelError(f"{path!r}: module {module_name!r} has no {qualname!r}") from None
    return target


def _import_from_working_directory() -> None:
    """Models next to the settings file import as they do with `python -m goinfer`.

    The `goinfer` console script's sys.path starts with its own bin folder, not the working
    directory; spawned workers inherit the parent's sys.path, so adding it here serves them too.
    Appended, so it never shadows an installed package.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def check_model_class(cls: object, where: str | None = None) -> type[Model]:
    """Refuse anything that would fail later, at the first request, with a clearer message."""
    name = where or getattr(cls, "__qualname__", repr(cls))
    if not (inspect.isclass(cls) and issubclass(cls, Model)):
        raise ModelError(f"{name}: not a subclass of goinfer.Model")
    label = cls.__qualname__
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ModelError(f"model {label} does not define {', '.join(missing)}")
    path = getattr(cls, "api_path", None)
    if path is None:
        raise ModelError(f"model {label} does not define api_path (e.g. api_path = \"/api/{label.lower()}\"), "
                         "and its Models: entry gives it no ApiPath")
    if not isinstance(path, str) or not (path.startswith("/") or path.startswith(NOAPI_PREFIX)):
        raise ModelError(f"model {label}: api_path must start with '/' or '{NOAPI_PREFIX}', got {path!r}")
    if not isinstance(cls.queue, str):
        raise ModelError(f"model {label}: queue must be a string, got {cls.queue!r}")
    size = cls.batch_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ModelError(f"model {label}: batch_size must be a positive integer, got {size!r}")
    timeout = cls.batch_timeout_ms
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise ModelError(f"model {label}: batch_timeout_ms must be a non-negative number, got {timeout!r}")
    for hook, arguments in HOOK_ARGUMENTS.items():
        _check_hook(cls, label, hook, arguments)
    return cls


# How the framework calls each hook (positionally): a method that cannot take these arguments
# would fail at every request (or at every worker start) with a TypeError far from its cause.
HOOK_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "init": (),
    "api_entry": ("data",),
    "infer": ("request_id", "params"),
    "infer_batch": ("batch",),
    "warmup": (),
    "cache_key": ("params",),
}


def _check_hook(cls: type, label: str, hook: str, arguments: tuple[str, ...]) -> None:
    attribute = inspect.getattr_static(cls, hook, None)
    if attribute is None:
        return  # infer_batch is optional; the others are abstract, so already checked
    expected = f"{hook}(self{''.join(', ' + a for a in arguments)})"
    bound: tuple[object, ...]
    if isinstance(attribute, staticmethod):
        function, bound = attribute.__func__, ()
    elif isinstance(attribute, classmethod):
        function, bound = attribute.__func__, (cls,)
    elif inspect.isfunction(attribute):
        function, bound = attribute, (object(),)
    elif hook == "infer_batch" and not callable(attribute):
        return  # not callable: the model is simply not batched (Model.supports_batching)
    else:
        raise ModelError(f"model {label}: {hook} must be a method {expected}, got {attribute!r}")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin or C function: nothing to inspect
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        raise ModelError(f"model {label}: {hook} must be a plain method {expected}, not async: "
                         "goinfer calls it directly")
    try:
        signature.bind(*bound, *arguments)
    except TypeError as exc:
        plain = signature.replace(parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                                  return_annotation=signature.empty)
        raise ModelError(f"model {label}: {hook} must accept {expected}; it is {hook}{plain} ({exc})") from None


class ModelRegistry:
    """An ordered set of model classes with unique api paths."""

    def __init__(self, classes: Iterable[type] = ()) -> None:
        self._classes: dict[str, type[Model]] = {}
        for cls in classes:
            self.add(cls)

    def add(self, cls: type) -> type[Model]:
        model = check_model_class(cls)
        existing = self._classes.get(model.api_path)
        if existing is not None and existing is not model and import_path_of(existing) != import_path_of(model):
            raise ModelError(
                f"models {existing.__qualname__} and {model.__qualname__} share api_path {model.api_path!r}"
            )
        self._classes[model.api_path] = model
        return model

    def extend_from_paths(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.add(import_model(path))

    @property
    def classes(self) -> list[type[Model]]:
        return list(self._classes.values())

    def import_paths(self) -> list[str]:
        return [import_path_of(cls) for cls in self._classes.values()]

    def __len__(self) -> int:
        return len(self._classes)


# The registry that `goinfer.register` fills: go-infer's `types.ModelList`.
default_registry = ModelRegistry()


def register(*classes: type) -> None:
    """Add model classes for the `http`, `server` and `up` commands of your own click program.

    The Python spelling of go-infer's `types.ModelList = append(types.ModelList, &MyModel{})`.
    """
    for cls in classes:
        default_registry.add(cls)


def resolve_models(model_paths: Iterable[str], registry: ModelRegistry | None = None) -> ModelRegistry:
    """The models a command serves: those registered in code, then the settings' `Models:` list."""
    resolved = ModelRegistry((registry or default_registry).classes)
    resolved.extend_from_paths(model_paths)
    if not len(resolved):
        raise ModelError(
            "no models to serve: list them under 'Models:' in the settings file "
            "(e.g. - goinfer.models.echo:Echo) or register them with goinfer.register()"
        )
    return resolved


def instantiate(classes: Iterable[type[Model]], settings: object,
                versions: Mapping[str, ServedVersion] | None = None) -> dict[str, Model]:
    """One instance per model, keyed by api path, with the settings, its `Models:` entry and (in a
    worker) the version it serves attached, as `init` expects them."""
    instances: dict[str, Model] = {}
    for cls in classes:
        model = cls()
        model.settings = settings
        target = import_path_of(cls)
        model_config = getattr(settings, "model_config", None)
        config = model_config(target) if callable(model_config) else None
        if config is not None:  # else a `config` of the user's own class stays as it was
            model.config = config
        served = (versions or {}).get(target)
        if served is not None:
            model.version, model.version_path = served.number, served.path
        instances[cls.api_path] = model
    return instances


def code_digest(cls: type) -> str:
    """A short digest of the file that defines `cls` (of the class a target subclasses): a new
    `.py` after `goinfer reload` is a new model revision, so the result cache never serves an
    answer of the old code. "" when the source cannot be read (a built-in or frozen module)."""
    try:
        source = inspect.getsourcefile(cls)
        if source is None:
            return ""
        with open(source, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()[:12]
    except (OSError, TypeError):
        return ""
