"""The `feedloop` entry point: every command is listed and reachable, mistakes get one line."""

import subprocess
import sys

from feedloop.client.cli import COMMANDS, main


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "feedloop", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"  {name}" in out.stdout


def test_no_command_is_a_usage_error_with_the_command_list(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_an_unknown_command_is_a_one_line_usage_error():
    out = run("serv")
    assert out.returncode == 2
    assert out.stderr.startswith("feedloop: unknown command 'serv'")
    assert "Traceback" not in out.stderr


def test_every_command_answers_help():
    for name in COMMANDS:
        out = run(name, "--help")
        assert out.returncode == 0, (name, out.stderr)
        assert "usage:" in out.stdout.lower(), name


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("feedloop ")
