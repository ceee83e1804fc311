"""The console's configuration: one frozen dataclass, from flags, FEEDLOOP_CONSOLE_* variables, a
TOML file's [console] table and defaults, in that order of precedence.

The console is a client: it imports nothing of the core (whose config loader pulls the server's
dependencies), so it carries this small loader of its own over the same conventions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedloop.client import AsyncFeedloopClient

ENV_PREFIX = "FEEDLOOP_CONSOLE_"
SCALES = ("stars5", "thumbs", "unit")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ConsoleConfig:
    target: str = field(
        default="127.0.0.1:50051", metadata=_help("the feedloop gRPC server (host:port)")
    )
    host: str = field(default="127.0.0.1", metadata=_help("address the web console binds"))
    port: int = field(default=8080, metadata=_help("web console port (0: a free one, printed)"))
    admin_key: str = field(
        default="",
        metadata=_help(
            "API key with the admin role, used only to load the versions of an evaluation "
            "session on the server and to read human-evaluation reports (never for feedback: "
            "each rater's own name or key identifies them)"
        ),
    )
    tls: bool = field(default=False, metadata=_help("reach the server over TLS (system roots)"))
    ca_cert: str = field(default="", metadata=_help("CA bundle for the server's certificate"))
    client_cert: str = field(
        default="", metadata=_help("the console's certificate, for a server asking mutual TLS")
    )
    client_key: str = field(default="", metadata=_help("the key of --client-cert"))
    candidates: int = field(
        default=4, metadata=_help("candidates shown per prompt (rate, rank, correct)")
    )
    scale: str = field(
        default="stars5", metadata=_help("the rating scale raters see: stars5, thumbs or unit")
    )
    max_text_chars: int = field(
        default=1024,
        metadata=_help("longest prompt or correction a rater may send, in characters"),
    )
    evaluation_prompts: int = field(
        default=10, metadata=_help("most prompts in one blind evaluation session")
    )
    timeout_s: float = field(default=10.0, metadata=_help("deadline of one call to the server"))
    max_sessions: int = field(
        default=1000,
        metadata=_help("rater sessions held at once (the least recently used one is dropped)"),
    )

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if not 2 <= self.candidates <= 8:
            raise ValueError(f"candidates must be in [2, 8], got {self.candidates}")
        if self.max_text_chars < 1 or self.evaluation_prompts < 1 or self.max_sessions < 1:
            raise ValueError("max_text_chars, evaluation_prompts and max_sessions must be >= 1")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


def connect(config: ConsoleConfig, api_key: str, name: str, **options: Any) -> AsyncFeedloopClient:
    """A client of config.target speaking as `name` (with api_key when given)."""
    return AsyncFeedloopClient(
        config.target,
        api_key=api_key or None,
        client_name=name,
        tls=config.tls,
        root_ca_path=Path(config.ca_cert) if config.ca_cert else None,
        client_cert_path=Path(config.client_cert) if config.client_cert else None,
        client_key_path=Path(config.client_key) if config.client_key else None,
        timeout_s=config.timeout_s,
        **options,
    )


def _coerce(kind: type, value: Any, where: str) -> Any:
    if kind is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}") from None


def load_console_config(argv: list[str]) -> ConsoleConfig:
    """Flags over FEEDLOOP_CONSOLE_* over the TOML file's [console] table over defaults."""
    fields = {f.name: f for f in dataclasses.fields(ConsoleConfig)}
    kinds = {name: type(f.default) for name, f in fields.items()}
    parser = argparse.ArgumentParser(
        prog="feedloop console",
        description="The rating and evaluation console: a web app for people, a client of the "
        "feedloop server.",
    )
    parser.add_argument("--config", type=Path, help="a TOML file (its [console] table)")
    for name, f in fields.items():
        flag = "--" + name.replace("_", "-")
        if kinds[name] is bool:
            parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, default=None, help=f"{f.metadata['help']} ({f.default!r})")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config is not None:
        table = tomllib.loads(args.config.read_text(encoding="utf-8")).get("console", {})
        for key, value in table.items():
            if key not in fields:
                raise ValueError(f"{args.config}: unknown key [console] {key}")
            values[key] = _coerce(kinds[key], value, f"{args.config} [console] {key}")
    for name in fields:
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env is not None:
            values[name] = _coerce(kinds[name], env, ENV_PREFIX + name.upper())
        flag_value = getattr(args, name)
        if flag_value is not None:
            values[name] = _coerce(kinds[name], flag_value, "--" + name.replace("_", "-"))
    return ConsoleConfig(**values)
