import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from feedloop.core.config import add_config_flags, config_from_args, load_config
from feedloop.core.errors import ConfigError


@dataclass(frozen=True)
class Demo:
    port: int = 50051
    rate: float = 1.5
    name: str = "x"
    enabled: bool = False
    path: Path | None = None
    mode: Literal["fast", "slow"] = "fast"
    tags: tuple[str, ...] = field(default=())


def test_defaults_need_no_file_and_no_environment():
    assert load_config(Demo, env={}) == Demo()


def test_flags_beat_environment_beat_toml_beat_defaults(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('port = 1\nrate = 2.0\nname = "toml"\n[demo]\nenabled = true\n')
    env = {"FEEDLOOP_PORT": "2", "FEEDLOOP_RATE": "3.5", "FEEDLOOP_UNRELATED": "ignored"}
    config = load_config(Demo, flags={"port": "3"}, env=env, toml_path=toml, section="demo")
    assert (config.port, config.rate, config.name, config.enabled) == (3, 3.5, "toml", True)


def test_types_are_coerced_from_strings():
    env = {
        "FEEDLOOP_ENABLED": "yes",
        "FEEDLOOP_PATH": "~/x",
        "FEEDLOOP_MODE": "slow",
        "FEEDLOOP_TAGS": "a, b",
    }
    config = load_config(Demo, env=env)
    assert config.enabled is True and config.path == Path.home() / "x"
    assert config.mode == "slow" and config.tags == ("a", "b")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FEEDLOOP_PORT": "eighty"},
            r"port \(from \$FEEDLOOP_PORT\): 'eighty' is not a valid int",
        ),
        ({"FEEDLOOP_RATE": "nan"}, "rate"),
        ({"FEEDLOOP_ENABLED": "maybe"}, "enabled"),
        ({"FEEDLOOP_MODE": "medium"}, "not one of fast, slow"),
    ],
)
def test_bad_values_are_errors_naming_the_key_and_source(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Demo, env=env)


def test_unknown_toml_key_is_an_error(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'prot'"):
        load_config(Demo, env={}, toml_path=toml)


def test_missing_or_broken_toml_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, env={}, toml_path=tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("port = = 1")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(Demo, env={}, toml_path=tmp_path / "bad.toml")


def test_every_field_becomes_a_flag():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser, Demo)
    args = parser.parse_args(["--port", "7", "--mode", "slow"])
    config = config_from_args(Demo, args, section="demo", env={})
    assert (config.port, config.mode) == (7, "slow")


def test_a_process_specific_variable_beats_the_shared_one():
    env = {"FEEDLOOP_PORT": "1", "FEEDLOOP_DEMO_PORT": "2", "FEEDLOOP_OTHER_PORT": "3"}
    assert load_config(Demo, env=env, section="demo").port == 2
    assert load_config(Demo, env=env, section="elsewhere").port == 1


@dataclass(frozen=True)
class WithPercent:
    share: float = field(default=0.05, metadata={"help": "5% of requests: 100% would be all"})
    label: str = "50%"


def test_a_percent_sign_in_a_help_text_or_default_reaches_help_as_written():
    # argparse %-formats every help text: an undoubled % made `feedloop serve --help` crash.
    parser = argparse.ArgumentParser()
    add_config_flags(parser, WithPercent)
    text = parser.format_help()
    assert "5% of requests: 100% would be all (default: 0.05;" in text
    assert "(default: 50%;" in text
