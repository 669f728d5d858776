"""Human-readable output for xdsctl: plain tables, short versions, relative times."""

from __future__ import annotations

import time
from collections.abc import Sequence

from controlplane import resources
from controlplane.admin.v1 import admin_pb2


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(
            str(cell).ljust(width) for cell, width in zip(line, widths, strict=False)
        ).rstrip()
        for line in lines
    )


def ago(timestamp: float, now: float | None = None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0, int((now or time.time()) - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def short_type(type_url: str) -> str:
    known = resources.BY_URL.get(type_url)
    return known.short_name.upper() if known else type_url


def fleet_status(response: admin_pb2.GetFleetStatusResponse) -> str:
    if not response.nodes:
        return "no nodes connected"
    rows = []
    for node in response.nodes:
        if node.stuck:  # started empty, first sync not done in time: what it lacks, first
            rows.append(
                [
                    node.node_id,
                    node.group,
                    node.snapshot_version or "-",
                    node.protocol,
                    node.build_version or "-",
                    "*",
                    "STUCK",
                    "-",
                    "-",
                    f"since {ago(node.stuck_since)}: {'; '.join(node.missing)}",
                ]
            )
        for t in node.types:
            detail = t.nack_error if t.state == "NACKED" else ""
            rows.append(
                [
                    node.node_id,
                    node.group,
                    node.snapshot_version or "-",
                    node.protocol,
                    node.build_version or "-",
                    short_type(t.type_url),
                    t.state.replace("_", " "),
                    t.expected_version or "-",
                    t.acked_version or "-",
                    detail,
                ]
            )
    headers = [
        "NODE",
        "GROUP",
        "SNAPSHOT",
        "XDS",
        "ENVOY",
        "TYPE",
        "STATE",
        "WANTS",
        "ACKED",
        "ERROR",
    ]
    return table(headers, rows)


def history(response: admin_pb2.ListSnapshotsResponse) -> str:
    lines = []
    for group, pointers in sorted(response.groups.items()):
        marks = ", ".join(
            f"{name}={version}" for name, version in sorted(pointers.pointers.items())
        )
        lines.append(f"group {group}: {marks}")
    if not response.entries:
        lines.append("no snapshots published")
        return "\n".join(lines)
    rows = [
        [
            e.group,
            e.version,
            e.parent_version or "-",
            e.action,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.created_at)),
            e.actor,
            e.message,
        ]
        for e in response.entries
    ]
    lines.append(table(["GROUP", "VERSION", "PARENT", "ACTION", "TIME", "ACTOR", "MESSAGE"], rows))
    return "\n".join(lines)


def rollouts(response: admin_pb2.ListRolloutsResponse) -> str:
    if not response.rollouts:
        return "no rollouts"
    return "\n\n".join(rollout(r) for r in response.rollouts)


def bake_line(status: admin_pb2.RolloutStatus) -> str:
    """The bake as an operator follows it, or "" before it starts and after the rollout."""
    if status.phase != "canary" or not status.bake_started_at:
        return ""
    if status.bake_seconds_left > 0:
        return f"bake: {status.bake_seconds_left:.0f}s of {status.bake_seconds:g}s left"
    return f"bake: {status.bake_seconds:g}s passed"


def rollout(status: admin_pb2.RolloutStatus) -> str:
    probe_reason = status.probe_reason.splitlines()  # a failed probe's: then Envoy's log
    lines = [
        f"group {status.group}: {status.phase.upper()} candidate {status.candidate} "
        f"(stable was {status.previous_stable or '-'})",
        f"  staged {ago(status.staged_at)} by {status.actor}: {status.message or '-'}",
        f"  canaries: {status.canary_selector or '-'}",
        f"  existing ACKed {len(status.existing_acked)}/{status.min_existing}: "
        f"{', '.join(status.existing_acked) or '-'}",
        f"  fresh ACKed {len(status.fresh_acked)}/{status.min_fresh}: "
        f"{', '.join(status.fresh_acked) or '-'}",
        f"  fresh probe: {status.probe_state}" + (f" ({probe_reason[0]})" if probe_reason else ""),
        *(f"    {line}" for line in probe_reason[1:]),
    ]
    if bake := bake_line(status):
        lines.append(f"  {bake}")
    if status.pending:
        lines.append("  waiting for:")
        lines.extend(f"    {node.detail}" for node in status.pending)
    if status.traffic_prometheus:
        lines.append(
            f"  traffic checks ({status.traffic_prometheus}, every "
            f"{status.traffic_interval_seconds:g}s, {status.traffic_min_passes} pass(es) each):"
        )
        lines.extend(
            f"    {traffic_check(c, status.traffic_min_passes)}" for c in status.traffic_checks
        )
    if status.reason:
        ended = f" {ago(status.ended_at)}" if status.ended_at else ""
        lines.append(f"  outcome{ended}: {status.reason}")
    return "\n".join(lines)


def traffic_check(check: admin_pb2.TrafficCheckStatus, min_passes: int) -> str:
    bounds = [f"max {check.max:g}"] if check.HasField("max") else []
    bounds += [f"min {check.min:g}"] if check.HasField("min") else []
    value = f"{check.value:g}" if check.HasField("value") else "-"
    last = f"{check.state.upper().replace('_', ' ')} {ago(check.evaluated_at)}"
    line = (
        f"{check.name}: {last}, value {value} ({', '.join(bounds)}), "
        f"passes {check.passes}/{min_passes}, failures {check.failures}"
    )
    if check.state in ("no_data", "error") and check.detail:
        line += f": {check.detail}"
    return line
