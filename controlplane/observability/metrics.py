"""Prometheus metrics. Events (pushes, ACKs, NACKs, convergence, rollouts) are counted where
they happen; gauges that describe the current fleet are computed on each scrape from the
fleet, the assignments and the store, so they can never drift from the truth.

Label cardinality stays bounded: labels are groups, type URLs, protocols, pointer names,
phases and outcomes; never node ids. Versions appear only in the per-group info metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane.caches import CACHES
from controlplane.store import POINTERS

if TYPE_CHECKING:
    from controlplane.tls import TlsMaterial

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # *_created series double the output and nobody alerts on them
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class FleetView(Protocol):
    """What the scrape-time collector reads (implemented by app.ControlPlane)."""

    def stream_counts(self) -> dict[str, int]:
        """Open xDS streams by protocol."""
        ...

    def node_counts(self) -> dict[str, tuple[int, int]]:
        """By group: (connected nodes, nodes not ACKed on what they should hold)."""
        ...

    def pointers(self) -> dict[str, dict[str, str]]: ...

    def stable_sizes(self) -> dict[str, int]:
        """By group: bytes of the stable snapshot's resources."""
        ...

    def rollout_phases(self) -> dict[str, str]:
        """By group: the phase of the current or last rollout."""
        ...

    def stuck_counts(self) -> dict[str, int]:
        """By group: nodes stuck in their first sync (xds/first_sync.py)."""
        ...

    def guards_watching(self) -> dict[str, int]:
        """By group with a guard in its policy: 1 while a guard watches it, else 0."""
        ...


ROLLOUT_PHASES = ("canary", "awaiting_promotion", "promoted", "aborted")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stream_events = StreamEvents()
        self.registry.register(self.stream_events)
        self.stream_errors = Counter(
            "xdscp_stream_errors",
            "xDS streams ended by a protocol error",
            ["reason"],
            registry=self.registry,
        )
        self.ignored_requests = Counter(
            "xdscp_ignored_requests",
            "xDS requests ignored without ending their stream (e.g. a type not served)",
            ["reason"],
            registry=self.registry,
        )
        self.convergence = Histogram(
            "xdscp_convergence_seconds",
            "From a snapshot becoming a node's to that node ACKing every type of it",
            ["group"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.rollouts = Counter(
            "xdscp_rollouts",
            "Rollouts by outcome (promoted, aborted, rolled_back)",
            ["group", "outcome"],
            registry=self.registry,
        )
        self.traffic_evaluations = Counter(
            "xdscp_traffic_check_evaluations",
            "Evaluations of rollout traffic checks by result (pass, fail, no_data, error)",
            ["group", "check", "result"],
            registry=self.registry,
        )
        self.admin_refused = Counter(
            "xdscp_admin_refused",
            "Admin calls refused, by reason (admin/auth.py REFUSAL_REASONS)",
            ["reason"],
            registry=self.registry,
        )
        self.guard_trips = Counter(
            "xdscp_guard_trips",
            "Guards that tripped and rolled their group back to last_good",
            ["group"],
            registry=self.registry,
        )
        self.rollback_duration = Histogram(
            "xdscp_rollback_duration_seconds",
            "From a rollback command to every connected node ACKing it",
            ["group"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )

        self.identity_refusals = Counter(
            "xdscp_identity_refusals",
            "xDS streams refused because the client certificate does not grant the node "
            "id and group claimed (no_identity, claim_mismatch)",
            ["reason"],
            registry=self.registry,
        )
        self.handshake_failures = Counter(
            "xdscp_tls_handshake_failures",
            "TLS handshakes refused on the xDS or admin port, as gRPC reports them "
            "(no_client_certificate, untrusted_certificate, not_tls, handshake_failed)",
            ["reason"],
            registry=self.registry,
        )
        self.tls_reloads = Counter(
            "xdscp_tls_reloads",
            "Certificate files read by port: loaded, or refused (the last good set stays)",
            ["port", "result"],
            registry=self.registry,
        )
        self.database_up = Gauge(
            "xdscp_database_up",
            "1 while this server reaches its store's database (always 1 with SQLite); at 0 it "
            "serves the config it holds and refuses publishes",
            registry=self.registry,
        )
        self.rollout_leader = Gauge(
            "xdscp_rollout_leader",
            "1 on the replica that runs the canary gate and moves pointers (always 1 with one "
            "server)",
            registry=self.registry,
        )
        self.database_up.set(1)
        self.rollout_leader.set(1)
        self.tls_expiry = Gauge(
            "xdscp_tls_certificate_expiry_timestamp_seconds",
            "When the server certificate in use on each port expires (Unix time)",
            ["port"],
            registry=self.registry,
        )

    def tls_loaded(self, port: str, material: TlsMaterial | None) -> None:
        """Told by tls.ReloadingServerCredentials of every load of a port's files."""
        self.tls_reloads.labels(port, "loaded" if material else "refused").inc()
        if material is not None:
            self.tls_expiry.labels(port).set(material.not_after.timestamp())

    def watch(self, fleet: FleetView) -> None:
        self.registry.register(_FleetCollector(fleet))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StreamEventCounts:
    """What the streams of one type URL and group did: responses sent, their bytes, ACKs and
    NACKs received."""

    __slots__ = ("acks", "nacks", "pushed_bytes", "pushes")

    def __init__(self) -> None:
        self.pushes = self.pushed_bytes = self.acks = self.nacks = 0


class StreamEvents(Collector):
    """The counters of what xDS streams do most, by type URL and group, as plain numbers
    that the scrape reads: a Prometheus counter takes a lock on each increment, and one push
    to a fleet makes thousands of them. Counted on the event loop only."""

    FAMILIES = (
        ("pushes", "xdscp_pushes", "Responses sent to Envoys"),
        ("pushed_bytes", "xdscp_pushed_bytes", "Bytes of responses sent"),
        ("acks", "xdscp_acks", "ACKs received"),
        ("nacks", "xdscp_nacks", "NACKs received"),
    )

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], StreamEventCounts] = {}

    def of(self, type_url: str, group: str) -> StreamEventCounts:
        counts = self._counts.get((type_url, group))
        if counts is None:
            counts = self._counts[(type_url, group)] = StreamEventCounts()
        return counts

    def collect(self) -> Iterator[Metric]:
        counted = list(self._counts.items())  # at once: the loop may add a pair meanwhile
        for field, name, documentation in self.FAMILIES:
            family = CounterMetricFamily(name, documentation, labels=["type_url", "group"])
            for (type_url, group), counts in counted:
                family.add_metric([type_url, group], getattr(counts, field))
            yield family


class _FleetCollector(Collector):
    def __init__(self, fleet: FleetView) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            "xdscp_streams", "Open xDS streams", ["protocol"], self._fleet.stream_counts().items()
        )
        nodes = self._fleet.node_counts()
        yield _gauge(
            "xdscp_nodes",
            "Connected nodes",
            ["group"],
            ((g, connected) for g, (connected, _) in nodes.items()),
        )
        yield _gauge(
            "xdscp_nodes_out_of_sync",
            "Connected nodes not ACKed on the version they should hold",
            ["group"],
            ((g, lagging) for g, (_, lagging) in nodes.items()),
        )
        info = GaugeMetricFamily(
            "xdscp_group_version_info",
            "The version each pointer of each group holds",
            labels=["group", "pointer", "version"],
        )
        for group, pointers in self._fleet.pointers().items():
            for pointer in POINTERS:
                if pointer in pointers:
                    info.add_metric([group, pointer, pointers[pointer]], 1)
        yield info
        yield _gauge(
            "xdscp_snapshot_size_bytes",
            "Bytes of the resources in each group's stable snapshot",
            ["group"],
            self._fleet.stable_sizes().items(),
        )
        phases = GaugeMetricFamily(
            "xdscp_rollout_phase",
            "1 for the phase of each group's current or last rollout",
            labels=["group", "phase"],
        )
        for group, current in self._fleet.rollout_phases().items():
            for phase in ROLLOUT_PHASES:
                phases.add_metric([group, phase], 1 if phase == current else 0)
        yield phases
        yield _gauge(
            "xdscp_nodes_stuck",
            "Nodes that started empty and did not ACK every type they are served within "
            "--first-sync-timeout (stuck in initialization)",
            ["group"],
            self._fleet.stuck_counts().items(),
        )
        yield _gauge(
            "xdscp_guard_watching",
            "1 while a guard watches the group after a promotion (last_good held back)",
            ["group"],
            self._fleet.guards_watching().items(),
        )
        yield _gauge(
            "xdscp_cache_bytes",
            "Estimated bytes held by each cache shared between streams",
            ["cache"],
            ((name, cache.bytes) for name, cache in sorted(CACHES.items())),
        )
        yield _gauge(
            "xdscp_cache_entries",
            "Entries in each cache shared between streams",
            ["cache"],
            ((name, len(cache)) for name, cache in sorted(CACHES.items())),
        )


def _gauge(
    name: str, documentation: str, labels: list[str], values: Iterable[tuple[str, int]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label, value in values:
        family.add_metric([label], value)
    return family
