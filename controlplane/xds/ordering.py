"""What waits on what on one xDS stream: the ordering rules, in one table.

Envoy decides the order it applies configuration in; a control plane only decides when it
sends. These rules match what a real Envoy does (see tests/integration/test_envoy_warming.py):

- Envoy holds its CDS ACK while any cluster it was sent is warming, and an EDS cluster
  finishes warming only when its ClusterLoadAssignment arrives (a cluster whose definition
  changed is re-created and warms again). So nothing a warming cluster needs may wait for
  the CDS ACK, or the two wait on each other until Envoy's initial_fetch_timeout (forever
  with `0s`).
- Listeners and routes that point at new clusters should arrive after those clusters have
  warmed (make before break), so they wait for the CDS ACK, but only for a bounded time: a
  cluster that never warms must not hold back the rest of the configuration forever.
- Envoy asks for the endpoints of the clusters a CDS response adds or removes as soon as
  it has applied that response (before its ACK), and for the routes of the listeners an LDS
  response adds or removes. Until that request comes, EDS (RDS) waits, for at most
  SUBSCRIPTION_GRACE_SECONDS, so the endpoints (routes) go out once, for the new names,
  rather than once for the old names and again for the new.
- Any type may be sent again while its previous response is unACKed: a newer response
  supersedes it (the nonce rules in stream.py decide which ACK counts), so a new snapshot,
  an abort or a rollback reaches the client whatever is in flight.
"""

from __future__ import annotations

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

# How long types wait for a CDS ACK before they are sent anyway (`serve --warming-timeout`).
DEFAULT_WARMING_TIMEOUT_SECONDS = 10.0

# How long EDS (RDS) waits for the client to change its subscription after clusters
# (listeners) came or went.
SUBSCRIPTION_GRACE_SECONDS = 2.0

# type -> (the types whose unACKed response holds it back, why)
WAITS_FOR: dict[str, tuple[frozenset[str], str]] = {
    CLUSTER: (frozenset(), "clusters are the roots of the configuration"),
    ENDPOINT: (
        frozenset(),
        "a warming EDS cluster needs its endpoints, and Envoy holds the CDS ACK until it has them",
    ),
    SECRET: (
        frozenset(),
        "warming clusters and listeners need their secrets to finish warming",
    ),
    RUNTIME: (frozenset(), "runtime layers name no other resource"),
    LISTENER: (frozenset({CLUSTER}), "listeners route to clusters: make before break"),
    SCOPED_ROUTE: (frozenset({CLUSTER}), "scoped routes lead to routes that use clusters"),
    ROUTE: (frozenset({CLUSTER}), "routes send traffic to clusters: make before break"),
    VIRTUAL_HOST: (frozenset({CLUSTER}), "virtual hosts send traffic to clusters"),
    EXTENSION_CONFIG: (
        frozenset({CLUSTER}),
        "filter configs may name clusters (ext_authz, rate limit services)",
    ),
}

# The types whose responses a client ACKs only once what they define has warmed. Only these
# can hold others back for long, and a node waiting on one shows as WARMING.
WARMS_BEFORE_ACK: frozenset[str] = frozenset({CLUSTER})


def blockers(type_url: str) -> frozenset[str]:
    """The types whose unACKed responses hold `type_url` back."""
    return WAITS_FOR[type_url][0]


# The types some type waits for: while none of them awaits an ACK, no type is held back by one.
HOLD_OTHERS_BACK: frozenset[str] = frozenset().union(
    *(held_by for held_by, _ in WAITS_FOR.values())
)


# type -> the type an Envoy on ADS always asks for first, unless that one is paused. Envoy
# pauses CDS while a cluster warms and keeps it paused across a reconnect: on the new stream
# it asks for endpoints, listeners and routes, never for clusters, and would stay stuck.
# Its CDS subscription is taken as given (a wildcard), so a fix or rollback reaches it.
IMPLIES_SUBSCRIPTION: dict[str, str] = {ENDPOINT: CLUSTER}

# type -> the type its resources name, which a client subscribes to by name as soon as it
# has applied them (Envoy: before it ACKs them).
SUBSCRIBES_AFTER: dict[str, str] = {CLUSTER: ENDPOINT, LISTENER: ROUTE}

# Types whose resources Envoy re-creates when they change, so that what they name must be
# sent again: a re-created EDS cluster warms only when its ClusterLoadAssignment arrives,
# even if the endpoints did not change. (A listener re-created with the same route name
# shares the route it already has.)
RECREATED_ON_CHANGE: frozenset[str] = frozenset({CLUSTER})
