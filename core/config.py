"""Typed configuration: one frozen dataclass per process, built once at start-up.

Precedence, highest first: command-line flags, `FEEDLOOP_<FIELD>` environment variables, a TOML
file, then the dataclass defaults (which run everything embedded, with no file at all).

Every field of a config dataclass becomes a flag (`--field-name`), an environment variable
(`FEEDLOOP_FIELD_NAME`, or `FEEDLOOP_SERVE_FIELD_NAME` for one process only, which wins) and a
TOML key (`field_name`, at the top level or in the table named by the process, e.g. `[serve]`).
A field's help text is `field(metadata={"help": ...})`. An unknown
TOML key or a value of the wrong type is a ConfigError naming the key and where it came from.
Environment variables that name no field of this process are ignored: the environment is shared
by every process of a deployment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from feedloop.core.errors import ConfigError

T = TypeVar("T")
ENV_PREFIX = "FEEDLOOP_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def default_data_dir() -> Path:
    """Where feedloop keeps its default checkpoint and embedded stores."""
    return Path.home() / ".local" / "share" / "feedloop"


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, kind: Any, key: str, source: str) -> Any:
    """Convert a value from TOML or a string (env, flags) to the field's type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _coerce(value, args[0], key, source)
    if origin is tuple:
        item_type = typing.get_args(kind)[0]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{key} (from {source}): expected a list, got {value!r}")
        return tuple(
            _coerce(v.strip() if isinstance(v, str) else v, item_type, key, source)
            for v in items
            if v != ""
        )
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise ConfigError(
                f"{key} (from {source}): {value!r} is not one of {', '.join(map(str, allowed))}"
            )
        return value
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            result = float(value)
            if result != result:  # NaN
                raise ValueError(value)
            return result
        if kind is Path:
            return Path(os.path.expanduser(str(value)))
        if kind is str:
            if not isinstance(value, str | int | float):
                raise ValueError(value)
            return str(value)
    except ValueError:
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{key} (from {source}): {value!r} is not a valid {name}") from None
    raise ConfigError(f"{key}: unsupported config type {kind}")


def read_toml(path: Path, section: str | None) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    if section and isinstance(data.get(section), dict):
        table = {k: v for k, v in data.items() if not isinstance(v, dict)}
        table.update(data[section])
        return table
    return data


def load_config(
    cls: type[T],
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    toml_path: Path | None = None,
    section: str | None = None,
) -> T:
    """Build cls from flags (already typed or strings), environment, TOML and defaults."""
    kinds = _field_types(cls)
    values: dict[str, Any] = {}
    if toml_path is not None:
        for key, value in read_toml(toml_path, section).items():
            if isinstance(value, dict):
                continue  # another process's table
            if key not in kinds:
                raise ConfigError(
                    f"{toml_path}: unknown key {key!r} (known: {', '.join(sorted(kinds))})"
                )
            values[key] = _coerce(value, kinds[key], key, str(toml_path))
    for key, kind in kinds.items():
        # FEEDLOOP_SERVE_METRICS_PORT beats FEEDLOOP_METRICS_PORT: the environment is shared by
        # every process of a deployment, and some knobs (ports, threads) differ between them.
        names = [ENV_PREFIX + key.upper()]
        if section:
            names.insert(0, f"{ENV_PREFIX}{section.upper()}_{key.upper()}")
        for name in names:
            if env is not None and name in env:
                values[key] = _coerce(env[name], kind, key, f"${name}")
                break
    for key, value in (flags or {}).items():
        if key not in kinds:
            raise ConfigError(f"unknown option {key!r}")
        if value is not None:
            values[key] = _coerce(value, kinds[key], key, "--" + key.replace("_", "-"))
    try:
        config = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return config


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()
) -> None:
    """Add a --flag for every field of a config dataclass (default: not given)."""
    kinds = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
        )
        help_text = f.metadata.get("help", "")
        env_name = ENV_PREFIX + f.name.upper()
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=_metavar(kinds[f.name]),
            # argparse %-formats help texts: a literal % (a share, a default) must be doubled.
            help=f"{help_text} (default: {default}; env {env_name})".replace("%", "%%"),
        )


def _metavar(kind: Any) -> str:
    if kind is bool:
        return "BOOL"
    if typing.get_origin(kind) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    return getattr(kind, "__name__", "VALUE").upper().replace("NONETYPE", "")


def config_from_args(
    cls: type[T], args: argparse.Namespace, *, section: str, env: Mapping[str, str] | None = None
) -> T:
    """Build cls from parsed flags (see add_config_flags) plus --config, environment, defaults."""
    kinds = _field_types(cls)
    flags = {k: v for k, v in vars(args).items() if k in kinds and v is not None}
    toml_path = getattr(args, "config", None)
    return load_config(
        cls,
        flags=flags,
        env=os.environ if env is None else env,
        toml_path=Path(toml_path) if toml_path else None,
        section=section,
    )


def describe(config: Any) -> dict[str, Any]:
    """A JSON-friendly view of a config (for logs and manifests)."""
    return {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()
    }


def is_postgres_url(location: str | Path) -> bool:
    """A store or registry location that names a PostgreSQL database (else a local path)."""
    return str(location).startswith(("postgresql://", "postgres://"))
