"""What `xdsctl COMMAND --help` says beyond its flags: a description and examples for every
command, in one table, applied to the parser after every module registered its commands.

A command's own `description=` wins over the table's; every help shows defaults (those that
say something: not None, "", False or []). tests/unit/test_cli_help.py walks every command.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Iterator

WIDTH = 79  # descriptions are wrapped to this; examples stay as written

# command path -> (description, examples). Examples are shell lines, as typed.
MANUAL: dict[str, tuple[str, tuple[str, ...]]] = {
    "serve": (
        "Run the control plane: xDS for Envoys (state of the world and delta), the admin API "
        "for xdsctl, and /metrics, /healthz, /readyz over HTTP. The store keeps every "
        "snapshot; on start the stable version of each group is served again.",
        (
            "xdsctl serve",
            "xdsctl serve --store /var/lib/xdscp/xdscp.db --rollout-policy policy.yaml",
        ),
    ),
    "certgen": (
        "",  # certgen has its own description
        (
            "xdsctl certgen pki --trust-domain xdscp.local --server-name xdscp "
            "--node edge/envoy-web --canary edge/envoy-canary --admin-client",
        ),
    ),
    "store-key": (
        "Manage the key that seals Secret bodies in the store (serve --store-key-file).",
        ("xdsctl store-key create /etc/xdscp/store.key",),
    ),
    "store-key create": (
        "Write a new random 32-byte key to FILE, owner-only (0600). An existing file is never "
        "overwritten.",
        ("xdsctl store-key create /etc/xdscp/store.key",),
    ),
    "publish": (
        "Parse and check a directory of Envoy v3 YAML, show the diff against the group's "
        "stable version, and send it to the server, which stores it and serves it (or starts "
        "a canary rollout if the group has a rollout policy). Prints the new version.",
        (
            "xdsctl publish examples/config --group edge -m 'route /api to api-v2' --wait",
            "xdsctl publish config/ --group new-group --create-group --env prod",
        ),
    ),
    "status": (
        "One line per connected Envoy, like `istioctl proxy-status`: its group, its role "
        "(canary when its group's rollout policy picks it), the version it holds and the one "
        "it should hold, how long it has been connected, and its state: SYNCED, WARMING "
        "(clusters still warming), STALE (sent, not ACKed), NACKED (with Envoy's error) or "
        "NOT_SENT. --types shows every type of every node instead.",
        (
            "xdsctl status",
            "xdsctl status --group edge --node 'edge-canary-*'",
            "xdsctl status --types --node edge-1",
        ),
    ),
    "config-dump": (
        "What one node was sent, what it ACKed and what it should hold, per type, and the "
        "names of the resources it should hold; with --resources (or -o yaml) the resources "
        "themselves, secret values redacted unless --show-secrets (write token). Compare "
        "with the Envoy's own /config_dump.",
        (
            "xdsctl config-dump edge-1",
            "xdsctl config-dump edge-1 --type route --resources",
            "xdsctl config-dump edge-1 -o yaml > edge-1.yaml",
        ),
    ),
    "snapshots": (
        "The history of published, promoted, aborted and rolled back versions, newest first, "
        "and each group's pointers: stable, candidate, last_good.",
        ("xdsctl snapshots", "xdsctl snapshots --group edge --limit 10"),
    ),
    "get": (
        "Print a stored version's resources as the Envoy v3 YAML `publish` reads. Secret "
        "values read [redacted] unless --show-secrets (write token); with them, the output "
        "publishes back to the same version.",
        (
            "xdsctl get stable --group edge",
            "xdsctl get 3f2a9c1e --type route --name edge_routes",
        ),
    ),
    "validate": (
        "Check a config directory offline, as publish would: parse, references, Envoy's "
        "field rules and lint; with --envoy, Envoy itself validates it too. Exit status 0 "
        "clean (warnings allowed), 1 errors, 2 usage.",
        (
            "xdsctl validate examples/config",
            "xdsctl validate config/ --env prod --envoy .tools/envoy/envoy/_bin/envoy",
        ),
    ),
    "diff": (
        "Compare two snapshots, each a directory or a stored version (a version, a unique "
        "prefix of 8 or more hex digits, or stable, candidate, last_good of --group); with "
        "one directory, compare the group's stable version with it.",
        (
            "xdsctl diff config/ --group edge",
            "xdsctl diff last_good stable --group edge",
            "xdsctl diff 3f2a9c1e 7b0d44aa",
        ),
    ),
    "rollout": (
        "The canary gate of groups with a rollout policy: see where a rollout stands, "
        "promote a candidate that passed its canaries, or abort one.",
        ("xdsctl rollout status", "xdsctl rollout promote --group edge"),
    ),
    "rollout status": (
        "The current or last rollout of each group (or of --group): phase, candidate, "
        "which canaries ACKed it and which it still waits for, the bake time left, the fresh "
        "probe and the outcome. --watch follows a running rollout to its end.",
        ("xdsctl rollout status --group edge", "xdsctl rollout status --group edge --watch"),
    ),
    "rollout promote": (
        "Make the candidate stable for the whole group, once it passed its canaries "
        "(policies with auto_promote: false).",
        ("xdsctl rollout promote --group edge --reason 'canaries look good'",),
    ),
    "rollout abort": (
        "Stop a rollout: the canaries go back to stable and the candidate is marked rejected.",
        ("xdsctl rollout abort --group edge --reason '5xx on canary'",),
    ),
    "rollback": (
        "Put last_good (or --to VERSION) on every node of the group now, with no canary "
        "stage, and wait until they ACK it, printing N/M as ACKs arrive. A rollout in "
        "progress is aborted.",
        (
            "xdsctl rollback --group edge",
            "xdsctl rollback --group edge --to 3f2a9c1e --reason 'bad route'",
        ),
    ),
    "completion": (
        "Print a shell completion script for xdsctl, generated from its own commands and flags.",
        (
            "source <(xdsctl completion bash)",
            "xdsctl completion zsh > ~/.zfunc/_xdsctl",
        ),
    ),
}


TOP_EXAMPLES = (
    "xdsctl serve",
    "xdsctl publish examples/config --group edge",
    "xdsctl status --group edge",
    "xdsctl rollback --group edge",
    "xdsctl COMMAND --help",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples as written; defaults shown where they say something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, "", False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command under `parser`, depth first, as ("rollout status", its parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield " ".join((*path, name)), sub
                yield from commands(sub, (*path, name))


def apply(parser: argparse.ArgumentParser) -> None:
    """Give xdsctl and every command their description, examples and formatter."""
    parser.formatter_class = HelpFormatter
    parser.epilog = _examples(TOP_EXAMPLES)
    for path, command in commands(parser):
        description, examples = MANUAL.get(path, ("", ()))
        command.formatter_class = HelpFormatter
        if description and not command.description:
            command.description = textwrap.fill(description, WIDTH)
        if examples:
            command.epilog = _examples(examples)


def _examples(lines: tuple[str, ...]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)
