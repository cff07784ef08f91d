"""The one typed-config builder: a dataclass and a mapping (a YAML section, CLI flags) -> a validated object.

Recipes (:mod:`rlkit.recipe`), method configs (:mod:`rlkit.methods`), patch options (:mod:`rlkit.patches`) and
the CLI all build their settings here, so every user-facing config fails the same way: one line that says
where (``recipe.model.tiny``), what (``unknown key 'hiden_size'``) and what to do (``did you mean
'hidden_size'?``).

- :func:`build` builds a dataclass from a mapping: unknown keys name the nearest valid one, values are checked
  against the field annotations (:func:`coerce`), nested dataclasses are built recursively, and a field may
  take an alias (``field(metadata={"alias": "from"})``) for keys that are Python keywords.
- :func:`field_docs` reads the attribute docstrings (the string under a field) as help text;
  :func:`add_arguments` / :func:`from_arguments` turn a config dataclass into CLI flags and back, so a command
  takes its flags and defaults from the dataclass instead of repeating them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

__all__ = ["ConfigError", "RecipeError", "build", "coerce", "nearest", "field_docs", "add_arguments",
           "from_arguments", "simple_type"]


class ConfigError(ValueError):
    """A user-fixable problem in a config (recipe, method settings, patch options, CLI flags); the message is
    one line saying what to change."""


RecipeError = ConfigError  # the name recipes and methods raise


def nearest(key: str, choices: list[str], cutoff: float = 0.5) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, else the list of valid keys."""
    near = difflib.get_close_matches(key, choices, n=1, cutoff=cutoff)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(choices))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` against annotation ``tp``; raise ConfigError naming ``where``."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, get_args(tp)))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        if inner is Ellipsis:
            inner = Any
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML reads ``1e-5`` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _aliases(cls: type) -> dict[str, str]:
    return {f.metadata["alias"]: f.name for f in dataclasses.fields(cls) if "alias" in f.metadata}


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, data: Any, where: str = "recipe") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    The dataclass's own ``__post_init__`` checks run too; a ``ValueError`` they raise becomes a ConfigError
    prefixed with ``where``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = _hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    aliases = _aliases(cls)
    kwargs = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{nearest(str(key), fields + list(aliases))}")
        kwargs[name] = coerce(value, hints[name], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a section's own validation (e.g. KVCacheConfig)
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None


def simple_type(tp: Any) -> Any:
    """``bool``/``int``/``float``/``str`` for annotations of those (optionally ``| None``), else None."""
    if tp in (bool, int, float, str):
        return tp
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and args[0] in (bool, int, float, str):
            return args[0]
    return None


# --------------------------------------------------------------------------------------------------
# Field documentation and CLI flags


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Help text of each field: its attribute docstring (the string literal right under it), or
    ``metadata["help"]``; the base classes' docs are included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs.setdefault(f.name, str(f.metadata["help"]))
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _parse_list(inner: Any):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            return [inner(x) for x in items] if inner in (int, float) else items
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {inner.__name__} values, got {text!r}") \
                from None
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = (),
                  required: tuple[str, ...] = (), rename: dict[str, str] | None = None,
                  defaults: dict[str, Any] | None = None, prefix: str = "") -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (``snake_case`` -> ``--snake-case``), with the field's
    default and attribute docstring as help. Booleans become ``--flag`` / ``--no-flag``; ``Literal`` fields
    take ``choices``; lists take comma-separated values. Fields of other types (mappings, callables) are left
    out. ``rename`` maps a field to another flag name, ``defaults`` overrides a default for this command, and
    ``prefix`` is put before each destination name (two dataclasses with a field of the same name)."""
    docs = field_docs(cls)
    hints = _hints(cls)
    rename = rename or {}
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        tp = hints[f.name]
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        default = defaults.get(f.name, _default(f))
        help_text = docs.get(f.name, "").replace("``", "")
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": default}
        if f.name in required:
            kwargs.update(required=True, default=None)
        base = simple_type(tp)
        literal = [a for a in ([tp] + list(get_args(tp))) if get_origin(a) is Literal]
        seq = [a for a in ([tp] + list(get_args(tp))) if get_origin(a) in (list, tuple)]
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                help=f"{help_text} (default: {'on' if default else 'off'})".strip(), **kwargs)
            continue
        if prefix and not literal:
            kwargs["metavar"] = rename.get(f.name, f.name).upper()
        if literal:
            kwargs["choices"] = list(get_args(literal[0]))
        elif base is not None:
            kwargs["type"] = base
        elif seq:
            inner = (get_args(seq[0]) or (str,))[0]
            if inner in (int, float):
                kwargs["type"] = _parse_list(inner)
            else:  # strings may hold commas: one flag per item
                kwargs.update(action="append", default=None)
                help_text = f"{help_text} (repeatable)".strip()
        else:
            continue  # mappings, callables, objects: not a flag
        shown = "" if kwargs.get("default") in (None, []) or f.name in required else f" (default: {default})"
        parser.add_argument(flag, help=f"{help_text}{shown}".strip() or None, **kwargs)


def from_arguments(cls: type, args: argparse.Namespace, where: str = "command line", prefix: str = "",
                   **extra: Any) -> Any:
    """Build ``cls`` from the flags :func:`add_arguments` added (plus ``extra`` fields), validated by
    :func:`build`; a list value that came from a default keeps its type."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.init and hasattr(args, prefix + f.name):
            values[f.name] = getattr(args, prefix + f.name)
    values.update(extra)
    hints = _hints(cls)
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    for name, value in list(values.items()):
        if value is None and defaults.get(name) is not None:
            del values[name]  # a repeatable flag never given: the field's default
        elif isinstance(value, tuple) and get_origin(hints.get(name)) is not tuple:
            values[name] = list(value)
    return build(cls, values, where)
