"""Node identity: which node id and group a client may claim, and what its claims rest on.

With mTLS on the xDS port, a client's certificate decides what it may claim. A SAN grants
a node id and a group when it has one of these forms (TRUST is `serve --trust-domain`):

    URI  spiffe://TRUST/group/GROUP/node/NODE_ID     any node of this id and group
    URI  spiffe://TRUST/group/GROUP/canary/NODE_ID   the same, and it may count as a canary
    DNS  NODE_ID.GROUP.TRUST                          like the first form

GROUP and NODE_ID may be globs (`*`, `?`), so one certificate can serve a group
(`spiffe://TRUST/group/edge/node/*`). A node's group is its `node.cluster` ("default" when
empty). A stream whose first request claims anything its certificate does not grant is
refused with PERMISSION_DENIED. SANs of other forms or other trust domains grant nothing.

Without a client certificate (plaintext on loopback, TLS without --tls-client-ca, or the
server's own Unix socket) every claim is taken as made: the network is the trust boundary.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SPIFFE_SCHEME = "spiffe://"
CANARY_ROLE = "canary"
NODE_ROLE = "node"


@dataclass(frozen=True)
class Trust:
    """What a node's claims rest on."""

    certified: bool  # a client certificate proved its node id and group
    canary: bool  # its certificate (or, without one, its own word) lets metadata make it a canary


CLAIMED = Trust(certified=False, canary=True)


@dataclass(frozen=True)
class Grant:
    """One SAN's worth of permission: node ids and groups (globs), and the canary role."""

    group: str
    node_id: str
    canary: bool

    def allows(self, node_id: str, group: str) -> bool:
        return fnmatch.fnmatchcase(group, self.group) and fnmatch.fnmatchcase(node_id, self.node_id)


class IdentityRefused(Exception):
    """The client's certificate does not let it claim what it claimed."""

    def __init__(self, message: str, reason: str, node_id: str, group: str) -> None:
        super().__init__(message)
        self.reason = reason  # a metric label: no_identity, claim_mismatch
        self.node_id = node_id  # as claimed
        self.group = group


def grants(trust_domain: str, uris: Iterable[str], dns_names: Iterable[str]) -> list[Grant]:
    """The grants a certificate's URI and DNS SANs carry in `trust_domain`."""
    found = [g for uri in uris if (g := _spiffe_grant(trust_domain, uri)) is not None]
    suffix = "." + trust_domain
    for name in dns_names:
        if not name.endswith(suffix):
            continue
        labels = name[: -len(suffix)].split(".")
        if len(labels) == 2 and all(labels):
            found.append(Grant(group=labels[1], node_id=labels[0], canary=False))
    return found


def _spiffe_grant(trust_domain: str, uri: str) -> Grant | None:
    prefix = f"{SPIFFE_SCHEME}{trust_domain}/"
    if not uri.startswith(prefix):
        return None
    parts = uri[len(prefix) :].split("/")
    if len(parts) != 4 or parts[0] != "group" or parts[2] not in (NODE_ROLE, CANARY_ROLE):
        return None
    if not parts[1] or not parts[3]:
        return None
    return Grant(group=parts[1], node_id=parts[3], canary=parts[2] == CANARY_ROLE)


@dataclass(frozen=True)
class Certificate:
    """What the TLS handshake proved about a client: its certificate's SANs."""

    trust_domain: str
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]

    @classmethod
    def from_auth_context(
        cls, trust_domain: str, auth_context: Mapping[str, Iterable[bytes]]
    ) -> Certificate | None:
        """From gRPC's auth context; None when the connection carried no client certificate."""
        if not auth_context.get("x509_pem_cert"):
            return None
        return cls(
            trust_domain,
            tuple(v.decode(errors="replace") for v in auth_context.get("peer_uri", ())),
            tuple(v.decode(errors="replace") for v in auth_context.get("peer_dns", ())),
        )

    def admit(self, node_id: str, group: str) -> Trust:
        """The trust a claim of (node id, group) earns, or IdentityRefused."""
        held = grants(self.trust_domain, self.uris, self.dns_names)
        if not held:
            raise IdentityRefused(
                f"the client certificate grants no node identity in trust domain "
                f"{self.trust_domain!r} (SANs: {self.describe()})",
                "no_identity",
                node_id,
                group,
            )
        matching = [g for g in held if g.allows(node_id, group)]
        if not matching:
            raise IdentityRefused(
                f"node {node_id!r} of group {group!r} is not what the client certificate "
                f"grants ({self.describe()})",
                "claim_mismatch",
                node_id,
                group,
            )
        return Trust(certified=True, canary=any(g.canary for g in matching))

    def describe(self) -> str:
        return ", ".join([*self.uris, *self.dns_names]) or "none"
