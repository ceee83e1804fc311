"""ServeConfig from flags, FEEDLOOP_* variables and a TOML [serve] table; key files; buckets."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedloop.core.config import config_from_args
from feedloop.core.errors import ConfigError
from feedloop.server.auth import bearer_token, hash_key, load_keys
from feedloop.server.cli import build_parser
from feedloop.server.config import ServeConfig, is_loopback
from feedloop.server.ratelimit import RateLimiter


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeConfig:
    args = build_parser().parse_args(argv)
    return config_from_args(ServeConfig, args, section="serve", env=env or {})


def test_flags_beat_environment_beat_toml_beat_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "feedloop.toml"
    toml.write_text("[serve]\nport = 6000\nmax_batch_size = 8\nmax_queue_delay_ms = 4.5\n")
    config = parse(
        ["--config", str(toml), "--port", "7000"],
        env={"FEEDLOOP_MAX_BATCH_SIZE": "16", "FEEDLOOP_UNRELATED": "x"},
    )
    assert config.port == 7000  # flag
    assert config.max_batch_size == 16  # environment
    assert config.max_queue_delay_ms == 4.5  # TOML
    assert config.host == "127.0.0.1"  # default
    assert config.store_location == str(config.data_dir / "replay.sqlite3")
    assert config.registry_location == str(config.data_dir / "registry")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--tls-cert", "c.pem"], "tls_cert and tls_key"),
        (["--tls-client-ca", "ca.pem"], "mutual TLS"),
        (["--default-max-tokens", "99"], "default_max_tokens"),
        (["--port", "70000"], "port"),
        (["--log-level", "loud"], "log_level"),
        (["--feedback-commit-interval-ms", "-1"], "feedback_commit_interval_ms"),
        (["--unknown-generation-wait-ms", "-1"], "unknown_generation_wait_ms"),
    ],
)
def test_invalid_settings_are_config_errors_naming_the_key(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.com")


def test_key_file_accepts_hashes_and_plain_keys_and_rejects_mistakes(tmp_path: Path) -> None:
    good = tmp_path / "keys.toml"
    good.write_text(
        f'[[keys]]\nname = "a"\nsha256 = "{hash_key("s1")}"\nroles = ["generate"]\n'
        '[[keys]]\nname = "b"\nkey = "s2"\nroles = ["admin", "feedback"]\n'
    )
    keys = load_keys(good)
    assert keys[hash_key("s1")].name == "a"
    assert keys[hash_key("s2")].roles == frozenset({"admin", "feedback"})
    bad = {
        "no entries": "",
        "unknown role": '[[keys]]\nname = "a"\nkey = "k"\nroles = ["root"]\n',
        "no secret": '[[keys]]\nname = "a"\nroles = ["admin"]\n',
        "short hash": '[[keys]]\nname = "a"\nsha256 = "abc"\nroles = ["admin"]\n',
        "twice": '[[keys]]\nname = "a"\nkey = "k"\nroles = ["admin"]\n'
        '[[keys]]\nname = "b"\nkey = "k"\nroles = ["admin"]\n',
    }
    for case, text in bad.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="auth keys file"):
            load_keys(path)
            pytest.fail(f"accepted a key file with {case}")


def test_bearer_token_parsing() -> None:
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "bearer  abc "),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert bearer_token((("authorization", "Bearer"),)) is None
    assert bearer_token(()) is None


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.allow("k", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("other", now=0.0)  # buckets are per key
    assert limiter.allow("k", now=0.5)  # one token back after 1/rate seconds
    assert not limiter.allow("k", now=0.5)
    assert [limiter.allow("k", now=100.0) for _ in range(4)] == [True, True, True, False]
    assert RateLimiter(rate_per_s=0.0, burst=1).allow("k", now=0.0)  # 0: no limit
