"""Rollout policy: per node group, who the canaries are and what a candidate must prove.

Loaded from a YAML file the server is given (`xdsctl serve --rollout-policy FILE`):

    groups:
      edge:
        canary:                      # a node is a canary if it matches ANY rule given
          metadata: {canary: "true"} #   every listed node.metadata key has this value
          node_id: "edge-canary-*"   #   node.id matches this glob
          percent: 10                #   a stable hash of node.id falls in the first N%
        min_existing: 1              # canaries connected before staging that must ACK it
        min_fresh: 1                 # canaries starting from nothing on it that must ACK
        bake_seconds: 30             # quiet time after the above, before promotion
        ack_timeout_seconds: 30      # a canary sent the candidate must ACK within this
        deadline_seconds: 600        # the whole rollout must pass within this
        auto_promote: true           # false: wait for `xdsctl rollout promote`
        fresh_probe:                 # optional: start a throwaway Envoy on the candidate
          envoy_binary: /usr/local/bin/envoy   # relative: to this file's directory
          ready_timeout_seconds: 30
          isolate_network: false     # own network namespace (needs root / CAP_SYS_ADMIN)
          check: {listener: edge_http, path: /, host: example.com, expect_status: 200}
        traffic:                     # optional: Prometheus queries judge the canaries' traffic
          prometheus: http://127.0.0.1:9090
          interval_seconds: 10       # between evaluations, from the start of the bake
          timeout_seconds: 5         # per query, the whole HTTP exchange
          min_passes: 1              # passing evaluations of each check before promotion
          failure_limit: 1           # failing evaluations of a check that abort
          on_no_data: wait           # wait (does not count) | abort (counts as a failure)
          checks:                    # {{ canaries }} {{ group }} {{ window }}: traffic.py
            - {name: canary-5xx, query: 'sum(rate(...{node=~"{{ canaries }}"}[{{ window }}]))', max: 0.05}
        guard:                       # optional: keep watching the group after a promotion
          seconds: 300               #   how long; last_good stays put meanwhile
          first_sync_seconds: 30     #   a node starting on it must ACK every type within this
      web:
        guard: {seconds: 300}        # guard only: publish straight to stable, then guard

Every file path in a policy is made absolute when it is read: a relative one is taken
relative to the policy file's own directory (never the server's working directory), so the
same file works wherever `serve` is started from. `check_probe_binaries` runs each probe's
Envoy with `--version` at start-up, so a wrong path stops `serve` at once, not the first
rollout.

A group without a policy publishes straight to `stable`; so does a group with only a
`guard`. While a guard watches, a NACK of the new stable or a node that starts on it and does
not finish its first sync in time rolls the group back to last_good (guard.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.rollout.probe import (
    HttpCheck,
    ProbeConfig,
    envoy_binary_problem,
    network_isolation_problem,
)
from controlplane.rollout.traffic import (
    CHECK_NAME,
    MAX_CHECKS,
    NoData,
    TrafficCheck,
    TrafficPolicy,
    check_query,
    check_url,
)
from controlplane.xds.stream import NodeInfo

PROBE_METADATA_KEY = "xdscp.probe"  # the fresh probe's Envoy carries this; always a canary


class PolicyError(ValueError):
    """The policy file is unreadable or invalid; the message names the file and the field."""


@dataclass(frozen=True)
class CanarySelector:
    metadata: Mapping[str, str] = field(default_factory=dict)
    node_id_glob: str | None = None
    percent: float | None = None

    def matches(self, node: NodeInfo) -> bool:
        """What a node must prove to count (see docs/security.md): `node_id` and `percent`
        rest on its node id, which a client certificate proves when mTLS is on. Metadata is
        the node's own word: with a certificate, it counts only if the certificate grants
        the canary role, and the fresh probe's mark only from a client without one (the
        probe reaches xdscp over its Unix socket)."""
        if node.metadata.get(PROBE_METADATA_KEY) == "true" and not node.trust.certified:
            return True
        if (
            self.metadata
            and node.trust.canary
            and all(str(node.metadata.get(key)) == value for key, value in self.metadata.items())
        ):
            return True
        if self.node_id_glob is not None and fnmatch.fnmatchcase(node.id, self.node_id_glob):
            return True
        return self.percent is not None and _bucket(node.id) < self.percent

    def describe(self) -> str:
        rules = [f"metadata {k}={v}" for k, v in self.metadata.items()]
        if self.node_id_glob is not None:
            rules.append(f"node id {self.node_id_glob}")
        if self.percent is not None:
            rules.append(f"{self.percent:g}% of nodes")
        return " or ".join(rules)


def _bucket(node_id: str) -> float:
    """Where a node falls in 0..100, the same on every replica and after every restart."""
    digest = hashlib.sha256(node_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


@dataclass(frozen=True)
class GuardPolicy:
    seconds: float = 300.0
    first_sync_seconds: float = 30.0


@dataclass(frozen=True)
class RolloutPolicy:
    canary: CanarySelector | None  # None: no canary stage (a guard-only policy)
    min_existing: int = 1
    min_fresh: int = 0
    bake_seconds: float = 30.0
    ack_timeout_seconds: float = 30.0
    deadline_seconds: float = 600.0
    auto_promote: bool = True
    fresh_probe: ProbeConfig | None = None
    traffic: TrafficPolicy | None = None
    guard: GuardPolicy | None = None

    @property
    def stages(self) -> bool:
        """A publish goes to canaries first (else straight to stable)."""
        return self.canary is not None


def load_policies(path: str | Path) -> dict[str, RolloutPolicy]:
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise PolicyError(f"{path}: {error}") from None
    reader = _Reader(str(path), base=path.parent)
    groups = reader.mapping(document, "", keys={"groups"}).get("groups", {})
    return {
        str(group): _policy(reader, spec, f"groups.{group}")
        for group, spec in reader.mapping(groups, "groups").items()
    }


def _policy(reader: _Reader, spec: Any, where: str) -> RolloutPolicy:
    spec = reader.mapping(
        spec,
        where,
        keys={
            "canary", "min_existing", "min_fresh", "bake_seconds", "ack_timeout_seconds",
            "deadline_seconds", "auto_promote", "fresh_probe", "traffic", "guard",
        },
    )  # fmt: skip
    guard = _guard(reader, spec["guard"], f"{where}.guard") if "guard" in spec else None
    if "canary" not in spec:
        if guard is None:
            raise reader.error(where, "needs a `canary` selector, a `guard`, or both")
        if set(spec) != {"guard"}:
            staged = ", ".join(sorted(set(spec) - {"guard"}))
            raise reader.error(where, f"{staged} need(s) a `canary` selector")
        return RolloutPolicy(canary=None, guard=guard)
    defaults = RolloutPolicy(canary=CanarySelector())
    policy = RolloutPolicy(
        canary=_selector(reader, spec["canary"], f"{where}.canary"),
        min_existing=reader.count(spec, "min_existing", where, defaults.min_existing),
        min_fresh=reader.count(spec, "min_fresh", where, defaults.min_fresh),
        bake_seconds=reader.seconds(spec, "bake_seconds", where, defaults.bake_seconds),
        ack_timeout_seconds=reader.seconds(
            spec, "ack_timeout_seconds", where, defaults.ack_timeout_seconds
        ),
        deadline_seconds=reader.seconds(spec, "deadline_seconds", where, defaults.deadline_seconds),
        auto_promote=reader.boolean(spec, "auto_promote", where, defaults.auto_promote),
        fresh_probe=_probe(reader, spec["fresh_probe"], f"{where}.fresh_probe")
        if "fresh_probe" in spec
        else None,
        traffic=_traffic(reader, spec["traffic"], f"{where}.traffic")
        if "traffic" in spec
        else None,
        guard=guard,
    )
    if policy.min_existing == 0 and policy.min_fresh == 0 and policy.fresh_probe is None:
        raise reader.error(where, "proves nothing: set min_existing, min_fresh or fresh_probe")
    return policy


def _guard(reader: _Reader, spec: Any, where: str) -> GuardPolicy:
    spec = reader.mapping(spec, where, keys={"seconds", "first_sync_seconds"})
    defaults = GuardPolicy()
    guard = GuardPolicy(
        seconds=reader.seconds(spec, "seconds", where, defaults.seconds),
        first_sync_seconds=reader.seconds(
            spec, "first_sync_seconds", where, defaults.first_sync_seconds
        ),
    )
    if guard.seconds == 0:
        raise reader.error(f"{where}.seconds", "a guard of 0 seconds watches nothing")
    return guard


def _selector(reader: _Reader, spec: Any, where: str) -> CanarySelector:
    spec = reader.mapping(spec, where, keys={"metadata", "node_id", "percent"})
    if not spec:
        raise reader.error(where, "needs at least one of metadata, node_id, percent")
    metadata = reader.mapping(spec.get("metadata", {}), f"{where}.metadata")
    percent = spec.get("percent")
    if percent is not None and (
        isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 < percent <= 100
    ):
        raise reader.error(f"{where}.percent", f"expected a number in (0, 100], got {percent!r}")
    glob = spec.get("node_id")
    if glob is not None and not isinstance(glob, str):
        raise reader.error(f"{where}.node_id", f"expected a glob string, got {glob!r}")
    return CanarySelector(
        metadata={str(k): str(v) for k, v in metadata.items()},
        node_id_glob=glob,
        percent=float(percent) if percent is not None else None,
    )


def _probe(reader: _Reader, spec: Any, where: str) -> ProbeConfig:
    spec = reader.mapping(
        spec, where, keys={"envoy_binary", "ready_timeout_seconds", "isolate_network", "check"}
    )
    if not isinstance(spec.get("envoy_binary"), str) or not spec["envoy_binary"]:
        raise reader.error(f"{where}.envoy_binary", "needs the path of an Envoy binary")
    check = None
    if "check" in spec:
        check_spec = reader.mapping(
            spec["check"], f"{where}.check", keys={"listener", "path", "host", "expect_status"}
        )
        if not isinstance(check_spec.get("listener"), str):
            raise reader.error(f"{where}.check.listener", "needs a listener name")
        check = HttpCheck(
            listener=check_spec["listener"],
            path=str(check_spec.get("path", "/")),
            host=str(check_spec.get("host", "")),
            expect_status=reader.count(check_spec, "expect_status", f"{where}.check", 200),
        )
    return ProbeConfig(
        envoy_binary=reader.path(spec, "envoy_binary"),
        ready_timeout_seconds=reader.seconds(spec, "ready_timeout_seconds", where, 30.0),
        isolate_network=reader.boolean(spec, "isolate_network", where, False),
        check=check,
    )


def _traffic(reader: _Reader, spec: Any, where: str) -> TrafficPolicy:
    spec = reader.mapping(
        spec,
        where,
        keys={
            "prometheus", "interval_seconds", "timeout_seconds", "min_passes", "failure_limit",
            "on_no_data", "checks",
        },
    )  # fmt: skip
    try:
        url = check_url(spec.get("prometheus") if isinstance(spec.get("prometheus"), str) else "")
    except ValueError as error:
        raise reader.error(f"{where}.prometheus", str(error)) from None
    defaults = TrafficPolicy(prometheus=url, checks=())
    on_no_data = spec.get("on_no_data", defaults.on_no_data.value)
    if on_no_data not in {n.value for n in NoData}:
        raise reader.error(f"{where}.on_no_data", f"expected wait or abort, got {on_no_data!r}")
    checks = spec.get("checks")
    if not isinstance(checks, list) or not 1 <= len(checks) <= MAX_CHECKS:
        raise reader.error(f"{where}.checks", f"expected a list of 1 to {MAX_CHECKS} checks")
    policy = TrafficPolicy(
        prometheus=url,
        checks=tuple(_check(reader, c, f"{where}.checks[{i}]") for i, c in enumerate(checks)),
        interval_seconds=reader.seconds(spec, "interval_seconds", where, defaults.interval_seconds),
        timeout_seconds=reader.seconds(spec, "timeout_seconds", where, defaults.timeout_seconds),
        min_passes=reader.count(spec, "min_passes", where, defaults.min_passes),
        failure_limit=reader.count(spec, "failure_limit", where, defaults.failure_limit),
        on_no_data=NoData(on_no_data),
    )
    for key in ("interval_seconds", "timeout_seconds", "min_passes", "failure_limit"):
        if not getattr(policy, key):
            raise reader.error(f"{where}.{key}", "must be above 0")
    names = [c.name for c in policy.checks]
    if len(set(names)) != len(names):
        raise reader.error(f"{where}.checks", f"check names must be unique: {', '.join(names)}")
    return policy


def _check(reader: _Reader, spec: Any, where: str) -> TrafficCheck:
    spec = reader.mapping(spec, where, keys={"name", "query", "max", "min"})
    name, query = spec.get("name"), spec.get("query")
    if not isinstance(name, str) or not CHECK_NAME.fullmatch(name):
        raise reader.error(f"{where}.name", f"expected 1-64 of A-Z a-z 0-9 _ . -, got {name!r}")
    if not isinstance(query, str):
        raise reader.error(f"{where}.query", f"expected a PromQL string, got {query!r}")
    try:
        check_query(query)
    except ValueError as error:
        raise reader.error(f"{where}.query", str(error)) from None
    bounds = {}
    for key in ("max", "min"):
        value = spec.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise reader.error(f"{where}.{key}", f"expected a finite number, got {value!r}")
        bounds[key] = float(value) if value is not None else None
    if bounds["max"] is None and bounds["min"] is None:
        raise reader.error(where, "needs a threshold: max, min or both")
    return TrafficCheck(name=name, query=query, max=bounds["max"], min=bounds["min"])


def check_probe_binaries(policy_file: str | Path, policies: Mapping[str, RolloutPolicy]) -> None:
    """Raise PolicyError unless every fresh probe's Envoy binary runs `--version` and, where
    the probe isolates its network, a namespace can be made; the error names the policy
    file, the group, the key and (for the binary) the resolved path."""
    for group, policy in policies.items():
        if policy.fresh_probe is None:
            continue
        binary = policy.fresh_probe.envoy_binary
        problem = envoy_binary_problem(binary)
        if problem is not None:
            where = f"groups.{group}.fresh_probe.envoy_binary"
            raise PolicyError(f"{policy_file}: {where}: {binary}: {problem}")
        if policy.fresh_probe.isolate_network:
            problem = network_isolation_problem()
            if problem is not None:
                where = f"groups.{group}.fresh_probe.isolate_network"
                raise PolicyError(f"{policy_file}: {where}: {problem}")


class _Reader:
    """Typed field access that names the file and the field path in every error."""

    def __init__(self, source: str, base: Path = Path()) -> None:
        self.source = source
        self.base = base  # relative paths in the file are relative to this directory

    def error(self, where: str, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: {where or 'top level'}: {message}")

    def mapping(self, value: Any, where: str, keys: set[str] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where, f"expected a mapping, got {type(value).__name__}")
        if keys is not None:
            unknown = sorted(set(map(str, value)) - keys)
            if unknown:
                raise self.error(
                    where,
                    f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(keys))}",
                )
        return value

    def count(self, spec: dict[str, Any], key: str, where: str, default: int) -> int:
        value = spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(f"{where}.{key}", f"expected a whole number >= 0, got {value!r}")
        return value

    def seconds(self, spec: dict[str, Any], key: str, where: str, default: float) -> float:
        value = spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.error(f"{where}.{key}", f"expected seconds >= 0, got {value!r}")
        return float(value)

    def path(self, spec: dict[str, Any], key: str) -> Path:
        """`spec[key]` (a non-empty string) as an absolute path: relative to `base`."""
        return Path(os.path.abspath(self.base / spec[key]))

    def boolean(self, spec: dict[str, Any], key: str, where: str, default: bool) -> bool:
        value = spec.get(key, default)
        if not isinstance(value, bool):
            raise self.error(f"{where}.{key}", f"expected true or false, got {value!r}")
        return value
