"""Following a rollout, or a group's convergence, to its end: `publish --wait`,
`rollout status --watch` and the progress `rollback` prints.

A rollout is polled once a second (ListRollouts) over one channel; a line is printed when
what an operator acts on changes (phase, evidence, probe, pending canaries, traffic checks),
and while the bake runs, every BAKE_STEP_SECONDS. Convergence is waited for in short
WaitForConvergence steps, printing N/M when it moves. With --json each event is one JSON object on its own
line (JSON lines), and the last one says how it ended.

Exit status (for CI): 0 promoted (or converged), 1 aborted, 2 timed out (also when xdscp
stopped answering: a follow keeps asking through a restart or a blip until its timeout).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from controlplane.cli import render
from controlplane.cli.client import RPC_TIMEOUT_SECONDS, CommandError

if TYPE_CHECKING:
    from controlplane.admin.v1 import admin_pb2, admin_pb2_grpc

EXIT_PROMOTED, EXIT_ABORTED, EXIT_TIMEOUT = 0, 1, 2
POLL_SECONDS = 1.0
BAKE_STEP_SECONDS = 10.0
CONVERGENCE_STEP_SECONDS = 1.0
DEFAULT_TIMEOUT_SECONDS = 900.0
# Errors after which a follow asks again (until its timeout) instead of giving up at once.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

Metadata = Sequence[tuple[str, str]]


class Printer:
    """Text lines to `text_out`, or JSON lines to stdout."""

    def __init__(self, as_json: bool, text_out: IO[str] | None = None) -> None:
        self.as_json = as_json
        self._text_out = text_out

    def event(self, kind: str, text: str, body: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps({"event": kind, **body}, sort_keys=True), flush=True)
        else:
            print(text, file=self._text_out or sys.stdout, flush=True)


def message_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def follow_rollout(
    stub: admin_pb2_grpc.AdminStub,
    metadata: Metadata,
    group: str,
    candidate: str,
    timeout: float,
    printer: Printer,
) -> int:
    """Poll the rollout of `candidate` in `group` (any, if empty) until it ends or `timeout`."""
    from controlplane.admin.v1 import admin_pb2

    deadline = time.monotonic() + timeout
    last_key: tuple[Any, ...] | None = None
    last_bake_print = 0.0
    request = admin_pb2.ListRolloutsRequest(group=group)
    reach = _Reachability(printer)
    while True:
        try:
            listed = stub.ListRollouts(request, timeout=RPC_TIMEOUT_SECONDS, metadata=metadata)
        except grpc.RpcError as error:
            # The rollout goes on (or a restart aborted it): not an outcome to report.
            reach.failed(error)
            if time.monotonic() >= deadline:
                return _end(
                    printer,
                    "timeout",
                    EXIT_TIMEOUT,
                    f"gave up after {timeout:g}s (--timeout): xdscp did not answer",
                )
            _pause(deadline)
            continue
        reach.answered()
        status = next((r for r in listed.rollouts if r.group == group), None)
        if status is None:
            raise CommandError(f"group {group} has no rollout to follow")
        if candidate and status.candidate != candidate:
            raise CommandError(
                f"group {group} is now rolling out {status.candidate}, not {candidate}"
            )
        key = _key(status)
        baking = status.phase == "canary" and status.bake_seconds_left > 0
        now = time.monotonic()
        if key != last_key or (baking and now - last_bake_print >= BAKE_STEP_SECONDS):
            printer.event("rollout", progress_line(status), message_dict(status))
            last_key, last_bake_print = key, now
        if status.phase == "promoted":
            return _end(printer, "promoted", EXIT_PROMOTED, f"promoted {status.candidate}")
        if status.phase == "aborted":
            return _end(
                printer, "aborted", EXIT_ABORTED, f"aborted {status.candidate}: {status.reason}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _end(
                printer,
                "timeout",
                EXIT_TIMEOUT,
                f"gave up after {timeout:g}s (--timeout): the rollout is still {status.phase}",
            )
        time.sleep(min(POLL_SECONDS, remaining))


def follow_convergence(
    stub: admin_pb2_grpc.AdminStub,
    metadata: Metadata,
    group: str,
    version: str,
    since: float,
    timeout: float,
    printer: Printer,
) -> admin_pb2.WaitForConvergenceResponse:
    """Wait until every connected node of `group` ACKed `version`, or `timeout`, in short
    steps, printing N/M each time it moves. Returns the last answer."""
    from controlplane.admin.v1 import admin_pb2

    deadline = time.monotonic() + timeout
    last: tuple[int, int] | None = None
    answer: admin_pb2.WaitForConvergenceResponse | None = None
    reach = _Reachability(printer)
    while True:
        step = max(0.0, min(CONVERGENCE_STEP_SECONDS, deadline - time.monotonic()))
        request = admin_pb2.WaitForConvergenceRequest(
            group=group, version=version, since=since, timeout_seconds=step
        )
        try:
            answer = stub.WaitForConvergence(
                request, timeout=step + RPC_TIMEOUT_SECONDS, metadata=metadata
            )
        except grpc.RpcError as error:
            # What was asked for is done (published, rolled back); only the ACK count is
            # missing: at the timeout, answer with the last count seen.
            reach.failed(error)
            if time.monotonic() >= deadline:
                if answer is None:
                    raise
                return answer
            _pause(deadline)
            continue
        reach.answered()
        counts = (answer.acked_nodes, answer.total_nodes)
        if counts != last:
            printer.event(
                "convergence",
                f"{answer.acked_nodes}/{answer.total_nodes} nodes ACKed {version}",
                message_dict(answer),
            )
            last = counts
        if not answer.lagging or time.monotonic() >= deadline:
            return answer


def wait_for_group(
    stub: admin_pb2_grpc.AdminStub,
    metadata: Metadata,
    group: str,
    version: str,
    since: float,
    timeout: float,
    printer: Printer,
) -> int:
    """`publish --wait` for a group without a rollout policy: its convergence on `version`."""
    answer = follow_convergence(stub, metadata, group, version, since, timeout, printer)
    if answer.lagging:
        lagging = ", ".join(f"{n.node_id} ({n.state})" for n in answer.lagging)
        return _end(
            printer,
            "timeout",
            EXIT_TIMEOUT,
            f"gave up after {timeout:g}s (--timeout): not ACKed by {lagging}",
        )
    return _end(
        printer,
        "converged",
        EXIT_PROMOTED,
        f"all {answer.total_nodes} node(s) of group {group} ACKed {version}",
    )


def progress_line(status: admin_pb2.RolloutStatus) -> str:
    parts = [
        f"{status.phase.upper()} {status.candidate}",
        f"existing {len(status.existing_acked)}/{status.min_existing}",
        f"fresh {len(status.fresh_acked)}/{status.min_fresh}",
    ]
    if status.probe_state != "not_configured":
        parts.append(f"probe {status.probe_state}")
    if bake := render.bake_line(status):
        parts.append(bake)
    if status.traffic_checks:
        checks = ", ".join(
            f"{c.name} {c.state} {c.passes}/{status.traffic_min_passes}"
            for c in status.traffic_checks
        )
        parts.append(f"traffic {checks}")
    if status.pending:
        parts.append("waiting for " + "; ".join(p.detail for p in status.pending))
    if status.phase == "awaiting_promotion":
        parts.append(f"run `xdsctl rollout promote --group {status.group}`")
    return ", ".join(parts)


def _key(status: admin_pb2.RolloutStatus) -> tuple[Any, ...]:
    """What an operator acts on: a change of any of it is printed at once."""
    return (
        status.phase,
        tuple(status.existing_acked),
        tuple(status.fresh_acked),
        status.probe_state,
        bool(status.bake_started_at),
        tuple((p.node_id, p.waiting_for, tuple(p.types)) for p in status.pending),
        tuple((c.name, c.state, c.passes, c.failures) for c in status.traffic_checks),
    )


class _Reachability:
    """A follow's view of whether xdscp answers: a transient error (a restart, a blip) is
    said once and asked again; any other error is raised."""

    def __init__(self, printer: Printer) -> None:
        self._printer = printer
        self._down = False

    def failed(self, error: grpc.RpcError) -> None:
        if error.code() not in TRANSIENT:
            raise error
        if not self._down:
            name = error.code().name
            self._printer.event(
                "unreachable",
                f"cannot reach xdscp ({name}): trying again until --timeout",
                {"code": name},
            )
            self._down = True

    def answered(self) -> None:
        self._down = False


def _pause(deadline: float) -> None:
    time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def _end(printer: Printer, outcome: str, code: int, text: str) -> int:
    printer.event("end", text, {"outcome": outcome, "exit_code": code, "message": text})
    return code


def add_timeout_flag(parser: Any, what: str) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="S",
        help=f"with {what}: give up after S seconds, exit 2 (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )


def after_publish(args: argparse.Namespace, response: admin_pb2.PublishResponse) -> int:
    """`publish --wait`: the version (or a JSON "published" event), then follow what the
    publish started: the rollout it staged, or the group's convergence."""
    from controlplane.cli.client import call

    printer = Printer(args.json, text_out=sys.stderr)
    if args.json:
        printer.event("published", "", {"group": args.group, **message_dict(response)})
    else:
        print(response.version, flush=True)
    since = time.time()
    if response.outcome == "staged":
        return call(  # type: ignore[no-any-return]
            args,
            lambda stub, md: follow_rollout(
                stub, md, args.group, response.version, args.timeout, printer
            ),
        )
    return call(  # type: ignore[no-any-return]
        args,
        lambda stub, md: wait_for_group(
            stub, md, args.group, response.version, since, args.timeout, printer
        ),
    )
