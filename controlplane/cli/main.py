"""xdsctl: run the control plane, publish config, and inspect the fleet and history.

The CLI maps flags onto calls and nothing more: `serve` builds an app.Config, the other
commands call the admin gRPC API of a running server (--server or XDSCTL_SERVER). Each
module registers its own commands: serving (serve, certgen, store-key), publishing,
fleet (status, config-dump, snapshots, get), authoring (validate, diff), rollouts (rollout,
rollback), completion. `manual` gives every command its description and examples.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from types import ModuleType

# The command modules (and through them gRPC and Envoy's types) are imported by the functions
# below, not here: run() tunes the cycle collector before those imports.


def main(argv: Sequence[str] | None = None) -> int:
    from controlplane.cli.client import EXIT_FAILED, CommandError, one_channel_per_server

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with one_channel_per_server():
            return args.handler(args)
    except CommandError as error:
        print(f"xdsctl: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """xdsctl as a program: the console script's entry point, and `python -m`'s."""
    # Python's cycle collector looks at every object it tracks, and most here never die: the
    # imported modules (Envoy's descriptors) and what a command builds (a publish's values,
    # line maps and messages). Collect young objects after 100,000 allocations rather than
    # 700, from before the imports on, and freeze what the imports made out of its reach.
    # A publish spent a sixth of its time there.
    gc.set_threshold(100_000)
    _command_modules()
    gc.freeze()
    status = main()
    gc.freeze()  # what is left dies with the process: spare the interpreter's last pass
    sys.exit(status)


def _command_modules() -> tuple[ModuleType, ...]:
    from controlplane.cli import (
        authoring,
        completion,
        fleet,
        manual,
        publishing,
        rollouts,
        serving,
    )

    return authoring, completion, fleet, manual, publishing, rollouts, serving


def build_parser() -> argparse.ArgumentParser:
    from controlplane.cli.client import add_server

    authoring, completion, fleet, manual, publishing, rollouts, serving = _command_modules()
    parser = argparse.ArgumentParser(prog="xdsctl", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="show program's version number and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serving.add_commands(commands)
    publishing.add_commands(commands)
    fleet.add_commands(commands)
    authoring.add_commands(commands, add_server)
    rollouts.add_commands(commands)
    completion.add_commands(commands)
    manual.apply(parser)
    return parser


class _Version(argparse.Action):
    """--version, read from the package's metadata only when asked: every other command
    starts without importing importlib.metadata."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(f"xdsctl {package_version()}")
        parser.exit()


def package_version() -> str:
    """The installed xdscp package's version (pyproject.toml), or "unknown" when the code
    runs from a checkout that was never installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("xdscp")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of controlplane.cli.main: run the
    # package's own, so that main() catches the CommandError its commands raise.
    from controlplane.cli.main import run as package_run

    package_run()
