"""Fields of the settings sections: each value's one default, help text and user-facing name.

A section (``EngineSettings``, ``HttpSettings``, ...) declares its user-facing fields
with :func:`option`; the field's metadata carries the help text and the setting name
(the TOML key, ``CACE_SERVER_<NAME>`` and ``--<name>``). The loader
(:mod:`cace_server.settings`) and the ``serve`` command are generated from it.
Fields declared with a plain ``field`` are Python-API only.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

_KEY = "cace_option"


@dataclass(frozen=True)
class Option:
    """What a field shows to users (kept in the field's metadata)."""

    name: str
    help: str
    #: the type users give (flag, TOML, environment) where it differs from the field's.
    raw: Any = None
    #: raw value -> field value (after conversion to ``raw``).
    parse: Callable[[Any], Any] | None = None
    #: field value -> text (help, README); ``show`` replaces it where the default is
    #: not a value a user could give (e.g. "half the cores").
    format: Callable[[Any], str] | None = None
    show: str | None = None
    #: extra flag spellings, e.g. ``-m``.
    aliases: tuple[str, ...] = ()


def option(
    default: Any = MISSING,
    *,
    help: str,
    name: str | None = None,
    default_factory: Callable[[], Any] | Any = MISSING,
    raw: Any = None,
    parse: Callable[[Any], Any] | None = None,
    format: Callable[[Any], str] | None = None,
    show: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field with a user-facing setting; ``name`` defaults to the field's."""
    # The field's own name is not known here: "" is filled in by options_of().
    meta = Option(name or "", help, raw, parse, format, show, aliases)
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={_KEY: meta})
    return dataclasses.field(default=default, metadata={_KEY: meta})


@dataclass(frozen=True)
class Setting:
    """One user-facing setting: its name, the field it sets and how users give it."""

    name: str
    field: dataclasses.Field[Any]
    option: Option
    #: the field's resolved type annotation.
    type: Any

    @property
    def raw_type(self) -> Any:
        return self.option.raw if self.option.raw is not None else self.type

    @property
    def default(self) -> Any:
        if self.field.default is not MISSING:
            return self.field.default
        assert self.field.default_factory is not MISSING, self.name
        return self.field.default_factory()

    def shown_default(self) -> str:
        """The default as the README and ``--help`` print it."""
        if self.option.show is not None:
            return self.option.show
        return show_value(self.default, self.option.format)

    def from_raw(self, value: Any) -> Any:
        """A user's value (a string from the environment, a TOML value or a flag's value)
        -> the field's value. An empty optional value means the default."""
        converted = convert(value, self.raw_type)
        if converted is None:
            return self.default
        return self.option.parse(converted) if self.option.parse else converted


def options_of(cls: type) -> list[Setting]:
    """The user-facing settings of a section, in field order."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_KEY)
        if meta is not None:
            out.append(Setting(meta.name or f.name, f, meta, hints[f.name]))
    return out


def show_value(value: Any, format: Callable[[Any], str] | None = None) -> str:
    if format is not None:
        return format(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "none"
    return str(value)


def _optional(annotation: Any) -> Any | None:
    """X for ``X | None``, else None."""
    args = get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return rest[0]
    return None


def convert(value: Any, annotation: Any) -> Any:
    """A string (environment), TOML value or flag value -> ``annotation``.

    Lists are comma-separated in strings; an optional value of "", "none" or "null"
    is None.
    """
    inner = _optional(annotation)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return convert(value, inner)
    origin = get_origin(annotation)
    if origin in (list, tuple):
        item = get_args(annotation)[0]
        items = value.split(",") if isinstance(value, str) else list(value)
        out = [convert(v.strip() if isinstance(v, str) else v, item) for v in items if v != ""]
        return tuple(out) if origin is tuple else out
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if annotation in (int, float, str):
        return annotation(value)
    return value
