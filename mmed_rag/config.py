"""Typed stage configs: dataclass defaults, then a YAML file, then the command line.

Every stage has one dataclass whose field defaults are the single source of truth. A YAML file in ``configs/``
overrides some of them (unknown keys are errors naming the file, so a typo never silently falls back to a
default), and any field can be overridden again from the command line (``--field value``). The resolved config
is saved next to every artefact a stage writes, so an output says how it was made.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mmed_rag.atomic import atomic_write_text
from mmed_rag.errors import MMedRAGError

C = TypeVar("C")
CONFIG_FILE_NAME = "config.yaml"


class ConfigError(MMedRAGError, ValueError):
    """A config file or override that does not fit its dataclass."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently convert) one value against its annotation, e.g. a YAML list for a tuple field."""
    inner, optional = _strip_optional(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_rest) = typing.get_args(inner) or (Any,)
        items = [_coerce(item, item_type, f"{where}[{index}]") for index, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner in (int, float, str) and not (isinstance(value, inner) and not isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {inner.__name__}, got {value!r}")
    return value


def checked_values(cls: type, values: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """``values`` checked against ``cls``'s fields (unknown keys and wrong types are errors naming ``source``),
    without building it: a YAML preset may leave a required field, or a field another depends on, to the command
    line."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a mapping of field names to values, got {type(values).__name__}")
    types_by_name = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(unknown)}; {cls.__name__} has: {', '.join(sorted(known))}"
        )
    return {name: _coerce(value, types_by_name[name], f"{source}: {name}") for name, value in values.items()}


def config_from_dict(cls: type[C], values: Mapping[str, Any], source: str = "config") -> C:
    """Build ``cls`` from a mapping; unknown keys and wrong types are errors naming ``source``."""
    checked = checked_values(cls, values, source)
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        options = ", ".join(f"--{name.replace('_', '-')}" for name in missing)
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)} (give {options} or a YAML file)")
    try:
        return cls(**checked)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # a dataclass's own checks (__post_init__)
        raise ConfigError(f"{source}: {error}") from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """Dataclass defaults, updated by the YAML file at ``path``, updated by ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config {path} is not valid YAML: {error}") from None
        values.update(checked_values(cls, loaded or {}, str(path)))
    values.update(overrides or {})
    return config_from_dict(cls, values, "command line" if overrides else str(path or cls.__name__))


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML-able values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(item) for item in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return {name: plain(value) for name, value in dataclasses.asdict(config).items()}


def save_config(config: Any, directory: str | Path, name: str = CONFIG_FILE_NAME) -> Path:
    """Write the resolved config as YAML beside an artefact (atomically)."""
    path = Path(directory) / name
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


# -- command line --------------------------------------------------------------------------------------------


class _Switch(argparse.Action):
    """``--flag`` sets True, ``--no-flag`` False.

    argparse's BooleanOptionalAction decides by the ``--no-`` prefix of the option typed, so for a field named
    ``no_retrieval`` it would read ``--no-retrieval`` as False.
    """

    def __init__(self, option_strings, dest, **kwargs):
        self.negatives = [f"--no-{option[2:]}" for option in option_strings]
        super().__init__([*option_strings, *self.negatives], dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negatives)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field`` option per dataclass field (plus ``--config FILE``).

    Options default to "not given" so that only what the user typed overrides the YAML file; help texts come
    from ``field(metadata={"help": ...})`` and show the dataclass default. A field with
    ``metadata={"positional": True}`` becomes a positional argument; ``metadata={"aliases": [...]}`` adds option
    names (the original scripts' spellings, e.g. ``--eval_jsonl``).
    """
    parser.add_argument(
        "--config", metavar="YAML", help=f"YAML file with {cls.__name__} fields (overridden by options)"
    )
    types_by_name = _field_types(cls)
    for f in _own_fields_first(cls):
        if not f.init:
            continue
        inner, _optional = _strip_optional(types_by_name[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        kwargs: dict[str, Any] = {"help": f"{f.metadata.get('help', '')} (default: {default!r})".strip()}
        origin = typing.get_origin(inner)
        if origin in (tuple, list):
            (item_type, *_rest) = typing.get_args(inner) or (str,)
            kwargs["nargs"] = "+"
            inner, origin = item_type, typing.get_origin(item_type)
        if origin is Literal:
            kwargs["choices"] = typing.get_args(inner)
        elif inner is bool:
            kwargs["action"] = _Switch
        elif inner in (int, float):
            kwargs["type"] = inner
        if f.metadata.get("positional"):
            kwargs.pop("help")
            parser.add_argument(
                f.name,
                nargs=kwargs.pop("nargs", None),
                default=argparse.SUPPRESS,
                help=f.metadata.get("help"),
                **kwargs,
            )
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        flags += list(f.metadata.get("aliases", ()))
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, **kwargs)


def _own_fields_first(cls: type) -> list[dataclasses.Field]:
    """The fields a stage's config declares itself, then those of its option groups (BackendOptions,
    ShardOptions), so that ``--help`` opens with what the stage is about; dataclasses put inherited fields first."""
    own = vars(cls).get("__annotations__", {})
    return sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config a parsed command line asks for: defaults < ``--config`` YAML < explicit options."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    overrides = {name: value for name, value in vars(args).items() if name in names}
    return load_config(cls, getattr(args, "config", None), overrides)
