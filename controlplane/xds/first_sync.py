"""A fresh Envoy's first sync: the rule that tells a node stuck in initialization.

An Envoy that starts from nothing asks for clusters, ACKs them once they have initialized,
and only then asks for listeners (Envoy starts LDS after the cluster manager's initial
clusters are ready). A cluster that never finishes initializing (an active health check
that never answers, endpoints from a source that never answers) leaves it there for ever:
PRE_INITIALIZING, /ready 503, no listener bound. Seen from its own stream: it ACKed CDS and
never asked for LDS (or asked, and never ACKed it).

Rule (pure; the stream calls it with its own state and the time):
- A node is *expected* to sync the types it subscribed to, and on ADS an Envoy also the
  types every Envoy bootstrap asks for there (clusters and listeners) when its snapshot has
  any of them.
- Its first sync is complete once it ACKed each expected type at least once (any version:
  a push during start-up does not make a started Envoy stuck).
- A node that has not completed its first sync `first_sync_timeout` seconds after it
  connected (or after it was first given a snapshot) is STUCK from that moment, with what it
  is missing, if it started empty (held nothing when it connected), or if it never asked
  for a type it must sync: an Envoy that reconnects still stuck in initialization (xdscp
  restarted) reports the clusters it holds, and still never asks for listeners. A node that
  reconnected serving, with a cluster still warming (its CDS ACK held), is not stuck.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from controlplane.resources import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    ROUTE,
    RUNTIME,
    SCOPED_ROUTE,
    SECRET,
    VIRTUAL_HOST,
)
from controlplane.snapshot import Snapshot

# `serve --first-sync-timeout`: how long a fresh node may take to finish its first sync.
DEFAULT_FIRST_SYNC_TIMEOUT_SECONDS = 30.0

# What an Envoy bootstrap with ADS asks for on its own (cds_config and lds_config), in the
# order it asks: LDS only once the clusters have initialized.
BOOTSTRAP_TYPES: tuple[str, ...] = (CLUSTER, LISTENER)

# The names operators know the discovery services by, for what a stuck node is missing.
SERVICE_NAMES: dict[str, str] = {
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    LISTENER: "LDS",
    ROUTE: "RDS",
    SCOPED_ROUTE: "SRDS",
    VIRTUAL_HOST: "VHDS",
    SECRET: "SDS",
    RUNTIME: "RTDS",
    EXTENSION_CONFIG: "ECDS",
}


class TypeProgress(Protocol):
    """What the rule reads of one type of a stream (stream.TypeState has it)."""

    subscribed: bool
    sent_version: str | None
    awaiting_ack: bool
    acked_version: str | None
    nacked_version: str | None


def expected_types(
    subscribed: Iterable[str], snapshot: Snapshot, *, envoy_on_ads: bool
) -> tuple[str, ...]:
    """The types a node must ACK once to have completed its first sync."""
    expected = set(subscribed)
    if envoy_on_ads:
        expected.update(t for t in BOOTSTRAP_TYPES if snapshot.resources(t))
    return tuple(sorted(expected, key=lambda t: list(SERVICE_NAMES).index(t)))


def missing(types: Mapping[str, TypeProgress], expected: Iterable[str]) -> tuple[str, ...]:
    """What keeps the first sync from completing, one phrase per type; empty when complete."""
    gaps = []
    for type_url in expected:
        name = SERVICE_NAMES.get(type_url, type_url)
        state = types.get(type_url)
        if state is None or not state.subscribed:
            gaps.append(f"never asked for {name}")
        elif state.acked_version is not None:
            continue
        elif state.sent_version is None:
            gaps.append(f"{name} not sent")
        elif state.awaiting_ack:
            gaps.append(f"{name} sent, not ACKed")
        elif state.nacked_version is not None:
            gaps.append(f"{name} NACKed")
        else:
            gaps.append(f"{name} not ACKed")
    return tuple(gaps)


def stuck(started_empty: bool, types: Mapping[str, TypeProgress], expected: Iterable[str]) -> bool:
    """Judged once, when the first-sync timeout passes without the first sync complete."""
    expected = tuple(expected)
    if started_empty:
        return bool(missing(types, expected))
    return any(
        (state := types.get(type_url)) is None or not state.subscribed for type_url in expected
    )
