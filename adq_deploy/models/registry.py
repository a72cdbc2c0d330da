"""Model registry: build networks by name and rebuild them from the spec a checkpoint stores.

Every model built here carries ``model.adq_architecture``, a small dict a checkpoint can store
and :func:`build` can turn back into the same (untrained) network:

* ``{"name": "resnet20", "kwargs": {...}}`` names a registered factory: trusted, since the
  registry only holds code that is already imported;
* ``{"factory": "package.module:function", "kwargs": {...}}`` names arbitrary code. Rebuilding
  it imports that module and calls that function, which runs whatever code they contain, so
  :func:`build` does it only when the caller passes ``allow_import=True`` (CLI: ``--allow-import``).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = [
    "ArchitectureError",
    "UnknownModelError",
    "architecture_of",
    "available",
    "build",
    "get",
    "register",
    "unregister",
]

Factory = Callable[..., nn.Module]

_REGISTRY: dict[str, Factory] = {}

# "package.module:function" or "package.module:Class.attr": dotted identifiers on both sides.
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_FACTORY_RE = re.compile(rf"({_DOTTED}):({_DOTTED})")
_SPEC_KEYS = ("name", "factory", "kwargs")


class ArchitectureError(ValueError):
    """An architecture spec cannot be turned into a model; the message is always one line."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class UnknownModelError(ArchitectureError, KeyError):
    """No factory is registered under the requested name (both a ValueError and a KeyError)."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _same_factory(a: Factory, b: Factory) -> bool:
    # A reloaded module re-registers a new function object under the same module-level name:
    # allow that. Lambdas and local functions ("<lambda>", "f.<locals>.g") never match this way.
    if a is b:
        return True
    key_a = (getattr(a, "__module__", None), getattr(a, "__qualname__", None))
    key_b = (getattr(b, "__module__", None), getattr(b, "__qualname__", None))
    if None in key_a or "<" in str(key_a[1]):
        return False
    return key_a == key_b


def register(name: str, factory: Factory | None = None, *, overwrite: bool = False):
    """Register ``factory`` under ``name``.

    Use as a decorator, ``@register("resnet20")``, or call it, ``register("mine", fn)``; both
    return the factory unchanged. Registering a name again with a different factory raises
    ValueError unless ``overwrite=True``; registering the same factory again is a no-op.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def deco(fn: Factory) -> Factory:
        if not callable(fn):
            raise TypeError(f"factory for model {name!r} must be callable, got {type(fn).__name__}")
        old = _REGISTRY.get(name)
        if old is not None and not overwrite and not _same_factory(old, fn):
            raise ValueError(
                f"model {name!r} is already registered to {_describe(old)}; "
                "pass overwrite=True to replace it"
            )
        _REGISTRY[name] = fn
        return fn

    if factory is None:
        return deco
    return deco(factory)


def unregister(name: str) -> Factory:
    """Remove ``name`` from the registry and return its factory (UnknownModelError if absent)."""
    if name not in _REGISTRY:
        raise UnknownModelError(_unknown_message(name))
    return _REGISTRY.pop(name)


def available() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``.

    The model records ``model.adq_architecture = {"name": name, "kwargs": kwargs}``. An unknown
    name raises UnknownModelError (a KeyError and a ValueError) listing the available names.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownModelError(_unknown_message(name))
    model = _REGISTRY[name](**kwargs)
    return _record(model, {"name": name, "kwargs": copy.deepcopy(dict(kwargs))}, f"model {name!r}")


def build(architecture: dict, allow_import: bool = False) -> nn.Module:
    """Rebuild a model from a stored spec (see the module docstring for the two forms).

    ``kwargs`` may be left out (empty). Every problem with the spec, including a refused
    ``factory`` import, raises ArchitectureError with a one-line message. Exceptions raised by
    the factory itself while building (after its arguments were accepted) propagate unchanged.
    """
    if not isinstance(architecture, dict):
        raise ArchitectureError(
            f"architecture spec must be a dict, got {type(architecture).__name__}"
        )
    extra = sorted(str(k) for k in architecture if k not in _SPEC_KEYS)
    if extra:
        raise ArchitectureError(
            f"architecture spec has unknown keys {extra}; expected 'name' or 'factory', "
            "and 'kwargs'"
        )
    has_name, has_factory = "name" in architecture, "factory" in architecture
    if has_name == has_factory:
        raise ArchitectureError(
            "architecture spec needs exactly one of 'name' (a registered model) or "
            "'factory' ('package.module:function')"
        )
    kwargs = architecture.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ArchitectureError(
            f"architecture 'kwargs' must be a dict, got {type(kwargs).__name__}"
        )
    bad_keys = [k for k in kwargs if not isinstance(k, str)]
    if bad_keys:
        raise ArchitectureError(f"architecture 'kwargs' keys must be strings, got {bad_keys!r}")

    if has_name:
        name = architecture["name"]
        if not isinstance(name, str):
            raise ArchitectureError(
                f"architecture 'name' must be a string, got {type(name).__name__}"
            )
        if name not in _REGISTRY:
            raise UnknownModelError(_unknown_message(name))
        _check_signature(_REGISTRY[name], kwargs, f"model {name!r}")
        return get(name, **kwargs)

    target = architecture["factory"]
    if not isinstance(target, str):
        raise ArchitectureError(
            f"architecture 'factory' must be a string, got {type(target).__name__}"
        )
    match = _FACTORY_RE.fullmatch(target)
    if match is None:
        raise ArchitectureError(
            f"architecture 'factory' must look like 'package.module:function', got {target!r}"
        )
    if not allow_import:
        # Checked before any import: importing the module would already run its code.
        raise ArchitectureError(
            f"the checkpoint names code {target!r} as its model factory; building it imports "
            "and runs that code, so pass allow_import=True (CLI: --allow-import) only if you "
            "trust the checkpoint"
        )
    factory = _resolve(target, match.group(1), match.group(2))
    _check_signature(factory, kwargs, f"factory {target!r}")
    model = factory(**kwargs)
    return _record(
        model, {"factory": target, "kwargs": copy.deepcopy(dict(kwargs))}, f"factory {target!r}"
    )


def architecture_of(model: nn.Module) -> dict | None:
    """A copy of the spec recorded on ``model`` by :func:`get` / :func:`build`, or None."""
    spec = getattr(model, "adq_architecture", None)
    return copy.deepcopy(spec) if isinstance(spec, dict) else None


# --------------------------------------------------------------------------------------------


def _describe(fn: Factory) -> str:
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{mod}:{qual}" if mod else str(qual)


def _unknown_message(name: object) -> str:
    names = available()
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    listed = ", ".join(names) if names else "none"
    return f"unknown model {name!r}{hint}; available: {listed}"


def _resolve(target: str, module_name: str, attr_path: str) -> Factory:
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module's own code raised
        raise ArchitectureError(
            f"cannot import module {module_name!r} for factory {target!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ArchitectureError(
                f"factory {target!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    if not callable(obj):
        raise ArchitectureError(
            f"factory {target!r} is not callable (it is a {type(obj).__name__})"
        )
    return obj


def _check_signature(fn: Factory, kwargs: dict, what: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        raise ArchitectureError(f"{what} does not accept kwargs {sorted(kwargs)}: {exc}") from exc


def _record(model: object, spec: dict, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{what} returned {type(model).__name__}, not a torch.nn.Module")
    model.adq_architecture = spec
    return model
