"""Human-readable output for xdsctl: plain tables, short versions, relative times."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf import any_pb2

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
    return f"{since(timestamp, now)} ago" if timestamp else "-"


def since(timestamp: float, now: float | None = None) -> str:
    """How long ago `timestamp` was, in its largest unit: "42s", "5m", "3h", "2d"."""
    if not timestamp:
        return "-"
    seconds = max(0, int((now or time.time()) - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


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


def fleet_summary(response: admin_pb2.GetFleetStatusResponse) -> str:
    """One line per connected node, like `istioctl proxy-status`."""
    if not response.nodes:
        return "no nodes connected"
    rows = [
        [
            node.node_id,
            _group(node),
            "canary" if node.canary else "-",
            node.protocol,
            node.held_version or "-",
            node.snapshot_version or "-",
            node.state.replace("_", " ") or "-",
            since(node.connected_at),
            "; ".join(filter(None, [_stuck(node), _pending(node.types)])),
        ]
        for node in response.nodes
    ]
    headers = ["NODE", "GROUP", "ROLE", "XDS", "HOLDS", "EXPECTED", "STATE", "CONNECTED", "DETAIL"]
    if any(node.replica for node in response.nodes):  # several replicas: which serves each
        headers.insert(1, "REPLICA")
        for row, node in zip(rows, response.nodes, strict=True):
            row.insert(1, node.replica or "-")
    return table(headers, rows)


def _group(node: admin_pb2.NodeStatus) -> str:
    if node.served_group and node.served_group != node.group:
        return f"{node.group or '-'} (uses {node.served_group})"
    return node.group or "-"


def _stuck(node: admin_pb2.NodeStatus) -> str:
    return f"stuck since {ago(node.stuck_since)}: {'; '.join(node.missing)}" if node.stuck else ""


def _pending(types: Sequence[admin_pb2.TypeStatus]) -> str:
    """What keeps a node from SYNCED: each NACK with Envoy's text, then the other types."""
    nacks = [f"{short_type(t.type_url)}: {t.nack_error}" for t in types if t.state == "NACKED"]
    waiting = [
        f"{short_type(t.type_url)} {t.state.replace('_', ' ')}"
        for t in types
        if t.state not in ("SYNCED", "NACKED")
    ]
    return "; ".join([*nacks, *waiting])


def node_config(
    response: admin_pb2.NodeConfigResponse,
    resources_yaml: Callable[[Sequence[any_pb2.Any]], str] | None = None,
) -> str:
    """`xdsctl config-dump` as text: per stream of the node, per type, the versions and the
    names it should hold (and the resources, with `resources_yaml`)."""
    blocks = []
    for stream in response.streams:
        node = stream.node
        lines = [
            f"node {node.node_id}: group {_group(node)}, {'canary' if node.canary else 'not a canary'}, "
            f"{node.protocol} stream {node.stream_id} connected {since(node.connected_at)}, "
            f"Envoy {node.build_version or '-'}",
            f"  state {node.state}: holds {node.held_version or '-'}, "
            f"expected {node.snapshot_version or '-'}",
        ]
        rows = [
            [
                short_type(t.status.type_url),
                t.status.state.replace("_", " "),
                t.status.sent_version or "-",
                ago(t.status.sent_at),
                t.status.acked_version or "-",
                t.status.expected_version or "-",
                str(len(t.names)) + (" (all)" if t.wildcard else ""),
            ]
            for t in stream.types
        ]
        headers = ["TYPE", "STATE", "SENT", "SENT AT", "ACKED", "EXPECTED", "RESOURCES"]
        lines.extend("  " + line for line in table(headers, rows).splitlines())
        for t in stream.types:
            if t.status.state == "NACKED" or t.status.nack_error:
                lines.append(
                    f"  {short_type(t.status.type_url)} NACKed {t.status.nacked_version}: "
                    f"{t.status.nack_error}"
                )
            lines.append(f"  {short_type(t.status.type_url)} should hold:")
            lines.extend(f"    {name}" for name in t.names)
            if not t.names:
                lines.append("    (nothing)")
            if resources_yaml is not None and t.resources:
                lines.extend("    " + line for line in resources_yaml(t.resources).splitlines())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def node_config_tree(
    response: admin_pb2.NodeConfigResponse,
    resources_yaml: Callable[[Sequence[any_pb2.Any]], list[Any]],
) -> dict[str, Any]:
    """`xdsctl config-dump -o yaml`: the dump as plain data, resources in `publish`'s form."""
    streams = []
    for stream in response.streams:
        node = stream.node
        streams.append(
            {
                "node": node.node_id,
                "group": node.group,
                "served_group": node.served_group,
                "canary": node.canary,
                "protocol": node.protocol,
                "stream_id": node.stream_id,
                "state": node.state,
                "held_version": node.held_version,
                "expected_version": node.snapshot_version,
                "types": [
                    {
                        "type": short_type(t.status.type_url),
                        "state": t.status.state,
                        "sent_version": t.status.sent_version,
                        "acked_version": t.status.acked_version,
                        "expected_version": t.status.expected_version,
                        **({"nack_error": t.status.nack_error} if t.status.nack_error else {}),
                        "names": list(t.names),
                        "resources": resources_yaml(t.resources),
                    }
                    for t in stream.types
                ],
            }
        )
    return {"streams": streams}


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
    blocks = [rollout(r) for r in response.rollouts] + [guard(g) for g in response.guards]
    return "\n\n".join(blocks) if blocks else "no rollouts"


def guard(status: admin_pb2.GuardStatus) -> str:
    """A group's guard after a promotion: watching (with time left), or how it ended."""
    head = f"group {status.group}: guard {status.phase.upper()} on {status.version}"
    if status.phase == "watching":
        return (
            f"{head}, {status.seconds_left:.0f}s of {status.seconds:g}s left\n"
            f"  a NACK, or an Envoy starting on it not synced within "
            f"{status.first_sync_seconds:g}s, rolls back to {status.rollback_to}"
        )
    return f"{head}, {ago(status.ended_at)}: {status.reason}"


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
