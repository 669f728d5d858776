"""`xdsctl completion bash` is a script bash accepts, generated from xdsctl's own parser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from controlplane.cli import completion, manual
from controlplane.cli.main import build_parser, main

BASH = shutil.which("bash")


def script(shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["completion", shell]) == 0
    return capsys.readouterr().out


def complete(script_text: str, line: str) -> list[str]:
    """What bash offers after `line` (a trailing space: a new word), with the script sourced."""
    assert BASH is not None, "bash is needed to test bash completion"
    program = (
        f"{script_text}\n"
        "complete -p xdsctl\n"
        'read -ra COMP_WORDS <<< "$LINE"\n'
        '[[ "$LINE" == *" " ]] && COMP_WORDS+=("")\n'
        "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
        "_xdsctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        [BASH, "--norc", "--noprofile", "-c", program],
        env={"LINE": line, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    first, *offered = done.stdout.splitlines()
    assert first == "complete -o default -F _xdsctl xdsctl"
    return [word for word in offered if word]


def test_bash_completes_every_command_from_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    text = script("bash", capsys)
    top = [path for path, _ in manual.commands(build_parser()) if " " not in path]
    offered = complete(text, "xdsctl ")
    assert [w for w in offered if not w.startswith("-")] == top
    assert "--version" in offered
    assert complete(text, "xdsctl ro") == ["rollout", "rollback"]
    assert complete(text, "xdsctl rollout ") == ["status", "promote", "abort", "--help"]
    assert complete(text, "xdsctl --group edge rollout pr") == ["promote"]


def test_bash_completes_flags_and_their_choices(capsys: pytest.CaptureFixture[str]) -> None:
    text = script("bash", capsys)
    assert {"--node", "--group", "--types", "--json"} <= set(complete(text, "xdsctl status --"))
    assert complete(text, "xdsctl config-dump edge-1 -o ") == ["text", "yaml", "json"]
    assert complete(text, "xdsctl completion ") == ["bash", "zsh", "--help"]


ZSH_CANDIDATES = """
try() {
  emulate -L sh  # as zsh's bashcompinit runs a bash completion function
  COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  COMPREPLY=()
  _xdsctl
  print -r -- "${COMPREPLY[*]}"
}
print -r -- "$_comps[xdsctl]"
try xdsctl rollout ""
try xdsctl --group edge rollout pr
try xdsctl config-dump edge-1 -o ""
"""


def test_zsh_registers_the_same_function_through_bashcompinit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """zsh itself sources the script; zsh's completion system, not the function, then keeps
    the candidates that start with what was typed, so the candidates are checked whole."""
    zsh = shutil.which("zsh")
    assert zsh is not None, "zsh is needed to test zsh completion (scripts/setup installs it)"
    text = script("zsh", capsys)
    assert text == completion.ZSH_PRELUDE + script("bash", capsys)
    done = subprocess.run(
        [zsh, "-f", "-c", text + ZSH_CANDIDATES],
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    registered, rollout, nested, choices = done.stdout.splitlines()[-4:]
    assert registered == "_bash_complete -o default -F _xdsctl"
    assert rollout == nested == "status promote abort --help"
    assert choices == "text yaml json"
