"""xdsctl config authoring: `validate` (offline) and `diff` (directories or stored versions).

`validate DIR [--env E] [--envoy PATH] [--format text|json]` needs no server: it parses the
config (with the environment's overlay), checks references, Envoy's field rules and the lint
rules, and with `--envoy` (or XDSCTL_ENVOY) asks a real Envoy binary too. Exit status: 0 clean
(warnings allowed), 1 errors, 2 usage (no such directory or environment, no runnable Envoy).

`diff A B` compares two snapshots, each a directory or a stored version; `diff DIR` compares
the group's stable version with DIR. Stored versions come from the server's admin API.
Secret values (private keys, passwords: see controlplane.redaction) are redacted on both
sides unless --show-secrets, so what the server shows a read token compares alike.

`add_commands` registers both on xdsctl's parser; `python -m controlplane.cli.authoring` runs
them alone. The CLI only maps flags onto calls: the work is in controlplane.config and
controlplane.diff.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane import resources
from controlplane.config.environments import (
    LoadedConfig,
    UnknownEnvironmentError,
    load_config,
)
from controlplane.config.loader import ConfigError, ConfigProblem, snapshot_of
from controlplane.diff import UNSET, ResourceDiff, diff_snapshots, render_diff
from controlplane.redaction import fingerprint_mask, redact_differences, redact_snapshot
from controlplane.snapshot import Snapshot

if TYPE_CHECKING:
    from controlplane.config.lint import Finding

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ENVOY_ENV = "XDSCTL_ENVOY"
RPC_TIMEOUT_SECONDS = 30.0


class UsageError(Exception):
    """The command was asked something that cannot be done as given (exit status 2)."""


def add_commands(subparsers: Any, add_server: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `validate` and `diff` on xdsctl's subparsers."""
    validate = subparsers.add_parser(
        "validate", help="check a config directory offline: parse, references, rules, lint"
    )
    validate.add_argument("directory", type=Path)
    validate.add_argument("--env", default=None, help="environment overlay to apply")
    validate.add_argument(
        "--envoy",
        type=Path,
        default=os.environ.get(ENVOY_ENV) or None,
        help=f"also run this Envoy binary in --mode validate (env {ENVOY_ENV})",
    )
    validate.add_argument("--group", default="default", help="node.cluster Envoy validates as")
    validate.add_argument(
        "--format", choices=("text", "json"), default="text", help="how to print the findings"
    )
    validate.add_argument(
        "--json", dest="format", action="store_const", const="json", help="--format json"
    )
    validate.set_defaults(handler=cmd_validate)

    diff = subparsers.add_parser(
        "diff", help="compare snapshots: A B (directories or versions), or the stable with DIR"
    )
    diff.add_argument("a", metavar="A", help="directory or stored version (see below)")
    diff.add_argument("b", metavar="B", nargs="?", help="directory or stored version")
    diff.add_argument(
        "--group",
        default="default",
        help="whose stable `diff DIR` compares with, and whose stable, candidate or last_good",
    )
    diff.add_argument("--env", default=None, help="environment overlay for directories")
    diff.add_argument(
        "--show-secrets",
        action="store_true",
        help="compare and print secret values; needs the write token (without it they are "
        "redacted on both sides, so a change to a secret alone does not show)",
    )
    diff.add_argument("--json", action="store_true", help="the diff as one JSON object")
    add_server(diff)
    diff.set_defaults(handler=cmd_diff)


# --- validate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" or "warning"
    stage: str  # config, references, field-rules, lint, envoy
    message: str
    file: str | None = None
    line: int | None = None
    field_path: str | None = None
    rule: str | None = None  # "XDS004 shadowed-route" for lint findings
    resource: str | None = None  # "route edge_routes"
    hint: str | None = None

    def text(self) -> str:
        label = f"{self.severity}[{self.rule}]" if self.rule else self.severity
        where = [self.file and (f"{self.file}:{self.line}" if self.line else self.file)]
        parts = [p for p in [*where, self.field_path, self.resource, self.message] if p]
        text = f"{label}: " + ": ".join(parts)
        return text + (f"\n    hint: {self.hint}" if self.hint else "")


@dataclass
class Report:
    directory: str
    environment: str | None
    version: str | None = None
    problems: list[Problem] = field(default_factory=list)
    envoy: dict[str, Any] | None = None

    @property
    def errors(self) -> int:
        return sum(1 for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> int:
        return sum(1 for p in self.problems if p.severity == "warning")


def validate_directory(
    directory: Path, env: str | None, envoy: Path | None = None, group: str = "default"
) -> Report:
    """Every check, offline. Raises UsageError for a missing directory, environment or Envoy."""
    from controlplane.config import envoy_validate
    from controlplane.config.field_rules import check_field_rules
    from controlplane.config.lint import lint

    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    report = Report(str(directory), env)
    try:
        loaded = load_config(directory, env)
    except UnknownEnvironmentError as error:
        raise UsageError(error.problems[0].message) from None
    except ConfigError as error:
        report.problems += [_problem(p, "config") for p in error.problems]
        return report
    snapshot = _snapshot(loaded, report)
    rule_problems = check_field_rules(loaded.resources, loaded.sources)
    report.problems += [_problem(p, "field-rules") for p in rule_problems]
    report.problems += [lint_problem(f) for f in lint(loaded.resources, loaded.sources)]
    if envoy is not None and snapshot is not None:
        try:
            verdict = envoy_validate.validate_with_envoy(snapshot, envoy, group=group)
        except envoy_validate.EnvoyUnavailableError as error:
            raise UsageError(str(error)) from None
        report.envoy = {"binary": str(envoy), "ok": verdict.ok, "message": verdict.message}
        if not verdict.ok:
            report.problems.append(Problem("error", "envoy", f"Envoy refuses: {verdict.message}"))
    return report


def _snapshot(loaded: LoadedConfig, report: Report) -> Snapshot | None:
    try:
        snapshot = snapshot_of(loaded.resources)
    except ConfigError as error:
        report.problems += [_problem(p, "references") for p in error.problems]
        return None
    report.version = snapshot.version
    return snapshot


def lint_problem(finding: Finding) -> Problem:
    """A lint finding as validate reports it (publish prints its refusals alike)."""
    return Problem(
        severity=finding.severity,
        stage="lint",
        message=finding.message,
        file=finding.location.file,
        line=finding.location.line,
        field_path=finding.field_path,
        rule=f"{finding.rule_id} {finding.rule_name}",
        resource=f"{finding.resource_type} {finding.resource_name}",
        hint=finding.hint,
    )


def _problem(problem: ConfigProblem, stage: str) -> Problem:
    location = problem.location
    return Problem(
        "error", stage, problem.message, location.file, location.line, problem.field_path
    )


def render_report(report: Report) -> str:
    lines = [problem.text() for problem in report.problems]
    if report.envoy is not None and report.envoy["ok"]:
        lines.append(f"envoy: {report.envoy['message']} ({report.envoy['binary']})")
    env = f" (environment {report.environment})" if report.environment else ""
    version = f", version {report.version}" if report.version else ""
    lines.append(
        f"{report.directory}{env}: {report.errors} error(s), {report.warnings} warning(s){version}"
    )
    return "\n".join(lines)


def report_json(report: Report) -> str:
    body = {
        "directory": report.directory,
        "environment": report.environment,
        "ok": report.errors == 0,
        "version": report.version,
        "errors": report.errors,
        "warnings": report.warnings,
        "problems": [asdict(p) for p in report.problems],
        "envoy": report.envoy,
    }
    return json.dumps(body, indent=2)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        report = validate_directory(args.directory, args.env, args.envoy, args.group)
    except UsageError as error:
        print(f"xdsctl: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(report_json(report) if args.format == "json" else render_report(report))
    return EXIT_FAILED if report.errors else EXIT_OK


# --- diff ----------------------------------------------------------------------------------


def cmd_diff(args: argparse.Namespace) -> int:
    if args.b is None:
        new, new_label = _resolve(args.a, args)
        old, old_label = stable_snapshot(args, args.group, args.show_secrets)
    else:
        old, old_label = _resolve(args.a, args)
        new, new_label = _resolve(args.b, args)
    diffs = diff_snapshots(old, new)
    if args.json:
        print(diff_json(old_label, new_label, diffs))
        return EXIT_OK
    print(f"--- {old_label}\n+++ {new_label}")
    print(render_diff(diffs), end="")
    return EXIT_OK


def diff_json(old_label: str, new_label: str, diffs: list[ResourceDiff]) -> str:
    """A field absent on one side has no "old" (or "new") key."""
    body = {
        "old": old_label,
        "new": new_label,
        "resources": [
            {
                "type": d.short_type,
                "name": d.name,
                "kind": d.kind,
                "changes": [
                    {"path": c.path}
                    | ({} if c.old is UNSET else {"old": c.old})
                    | ({} if c.new is UNSET else {"new": c.new})
                    for c in d.changes
                ],
            }
            for d in diffs
        ],
    }
    return json.dumps(body, indent=2)


def publish_preview(new: Snapshot, stable: tuple[Snapshot | None, str], show_secrets: bool) -> str:
    """The diff `xdsctl publish` shows before it sends: the group's `stable` (as
    `stable_snapshot` gives it, with its secrets) against `new`.

    Publishing needs the write token, which reads the stable with its secrets, so a changed
    secret shows: as a changed fingerprint mark (never its value) unless `show_secrets`.
    """
    old, old_label = stable
    header = f"+++ version {new.version}\n"
    if not show_secrets:
        old, new = redact_differences(old, new, fingerprint_mask())
    return f"--- {old_label}\n{header}" + render_diff(diff_snapshots(old, new))


def _resolve(spec: str, args: argparse.Namespace) -> tuple[Snapshot, str]:
    from controlplane.cli.client import CommandError

    path = Path(spec)
    if path.is_dir():
        snapshot, label = _from_directory(path, args.env)
        # Stored versions come redacted unless --show-secrets: redact directories alike.
        return (snapshot if args.show_secrets else redact_snapshot(snapshot)), label
    from controlplane.cli import versions

    if not versions.is_reference(spec):
        raise CommandError(f"{spec}: neither a directory nor {versions.HELP}")
    version = versions.resolve_arg(args, spec, args.group)
    label = f"version {version}" if version == spec else f"{spec} (version {version})"
    return _stored(args, version, args.show_secrets), label


def _from_directory(directory: Path, env: str | None) -> tuple[Snapshot, str]:
    from controlplane.cli.client import CommandError

    try:
        snapshot = snapshot_of(load_config(directory, env).resources)
    except ConfigError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        raise CommandError(f"{directory}: {len(error.problems)} error(s)") from None
    env_label = f", environment {env}" if env else ""
    return snapshot, f"{directory}{env_label} (version {snapshot.version})"


def _stored(args: argparse.Namespace, version: str, include_secrets: bool) -> Snapshot:
    from controlplane.cli.client import fetch_snapshot

    response = fetch_snapshot(args, version, include_secrets=include_secrets)
    resources.load_descriptors_within(packed.value for packed in response.resources)
    return Snapshot.from_serialized(
        (packed.type_url, resources.resource_name(resources.unpack_any(packed)), packed.value)
        for packed in response.resources
    )


def stable_snapshot(
    args: argparse.Namespace, group: str, include_secrets: bool
) -> tuple[Snapshot | None, str]:
    """The group's stable snapshot (None when the group has none yet) and its label.
    Raises CommandError (from controlplane.cli.client) if the server cannot be asked."""
    from controlplane.admin.v1 import admin_pb2
    from controlplane.cli.client import call

    request = admin_pb2.ListSnapshotsRequest(group=group, limit=1)
    response = call(
        args, lambda stub, md: stub.ListSnapshots(request, timeout=RPC_TIMEOUT_SECONDS, metadata=md)
    )
    pointers = response.groups[group].pointers if group in response.groups else {}
    version = pointers.get("stable", "")
    if not version:
        return None, f"group {group}: no stable version"
    return _stored(args, version, include_secrets), f"group {group} stable (version {version})"
