"""Every xdsctl command explains itself: a description, examples, and its defaults shown."""

from __future__ import annotations

import argparse

import pytest

from controlplane.cli import manual
from controlplane.cli.main import build_parser

COMMANDS = list(manual.commands(build_parser()))


def test_xdsctl_itself_has_examples() -> None:
    assert "examples:\n  xdsctl serve" in build_parser().format_help()


def test_the_walk_finds_every_command_including_nested_ones() -> None:
    paths = [path for path, _ in COMMANDS]
    for expected in ("serve", "status", "config-dump", "rollout status", "store-key create"):
        assert expected in paths
    assert sorted(manual.MANUAL) == sorted(paths)  # no entry for a command that is gone


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=[path for path, _ in COMMANDS])
def test_every_command_has_a_description_an_example_and_shows_its_defaults(
    path: str, parser: argparse.ArgumentParser
) -> None:
    text = parser.format_help()
    assert parser.description and parser.description.strip(), f"{path}: no description"
    assert "examples:" in text, f"{path}: no examples"
    examples = text.split("examples:", 1)[1]
    assert f"xdsctl {path}" in examples, f"{path}: no example runs it"
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default in (None, "", False, [], argparse.SUPPRESS):
            continue
        assert action.help, f"{path} {action.option_strings[0]}: no help"
        line = parser.formatter_class(prog="xdsctl")._get_help_string(action) or ""
        shown = line % {"default": default}
        forms = {str(default), f"{default:g}" if isinstance(default, float) else str(default)}
        assert "default" in line and any(form in shown for form in forms), (
            f"{path} {action.option_strings[0]}: default {default!r} not shown"
        )
