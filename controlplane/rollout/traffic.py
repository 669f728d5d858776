"""Traffic checks: Prometheus queries that judge a candidate by what the canaries serve.

A group's policy may name a Prometheus server and checks (`traffic:`, parsed in policy.py).
Once the canaries hold the candidate (the bake), the controller renders each query with the
canaries' node ids, asks Prometheus (`PrometheusClient`, blocking: run it off the event
loop) and hands the results to the gate, which decides (gate.py).

Prometheus' answer is hostile input: `parse_answer` accepts only a success document holding
one scalar or an instant vector of at most one series, with a numeric value; an empty vector
or NaN is "no data". Limits: MAX_ANSWER_BYTES per answer, the policy's timeout_seconds for
the whole exchange, no redirects and no proxies (HTTP goes only to the configured URL).
"""

from __future__ import annotations

import enum
import http.client
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_ANSWER_BYTES = 1024 * 1024
MAX_QUERY_CHARS = 8192
MAX_CHECKS = 16
CHECK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# {{ canaries }}: the canary node ids on the candidate, as a regex alternation for =~
# {{ group }}: the node group; {{ window }}: time since the bake began, e.g. "12s"
TEMPLATE_NAMES = ("canaries", "group", "window")
# Node ids and groups go into PromQL strings only if they are made of these characters;
# "." becomes "[.]" so the regex needs no backslash (which a PromQL string would eat).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.:@/-]+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN")
_ERROR_TEXT_CHARS = 300


class TrafficError(Exception):
    """A query could not be run or its answer is unusable; the message says why."""


class NoData(enum.Enum):
    WAIT = "wait"  # the evaluation does not count; the rollout's deadline bounds the wait
    ABORT = "abort"  # the evaluation counts as a failure


@dataclass(frozen=True)
class TrafficCheck:
    name: str
    query: str  # PromQL with {{ name }} placeholders (TEMPLATE_NAMES)
    max: float | None = None  # fails when the value is above
    min: float | None = None  # fails when the value is below

    def threshold(self) -> str:
        bounds = [f"max {self.max:g}"] if self.max is not None else []
        bounds += [f"min {self.min:g}"] if self.min is not None else []
        return ", ".join(bounds)


@dataclass(frozen=True)
class TrafficPolicy:
    prometheus: str  # base URL; queries go to {prometheus}/api/v1/query
    checks: tuple[TrafficCheck, ...]
    interval_seconds: float = 10.0
    timeout_seconds: float = 5.0
    min_passes: int = 1  # passing evaluations of EACH check before promotion
    failure_limit: int = 1  # failing evaluations of a check that abort the rollout
    on_no_data: NoData = NoData.WAIT


class Outcome(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no_data"
    ERROR = "error"  # Prometheus unreachable, a bad query, an unusable answer


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: Outcome
    query: str  # as sent
    value: float | None = None
    detail: str = ""


def check_url(url: str) -> str:
    """The Prometheus base URL, or ValueError saying what is wrong with it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"expected a base URL without query, fragment or credentials: {url!r}")
    return url.rstrip("/")


def check_query(query: str) -> None:
    """ValueError unless every placeholder is known and properly written."""
    if not query.strip():
        raise ValueError("the query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"the query is over {MAX_QUERY_CHARS} characters")
    unknown = sorted({m for m in TEMPLATE.findall(query) if m not in TEMPLATE_NAMES})
    if unknown:
        raise ValueError(
            f"unknown placeholder(s) {', '.join(unknown)}; valid: {', '.join(TEMPLATE_NAMES)}"
        )
    if "{{" in TEMPLATE.sub("", query) or "}}" in TEMPLATE.sub("", query):
        raise ValueError("a placeholder is not of the form {{ name }}")


def render(query: str, *, canaries: Iterable[str], group: str, window_seconds: float) -> str:
    """The query with its placeholders filled in; TrafficError for a name unsafe in PromQL."""
    names = sorted(set(canaries))
    for name in [*names, group]:
        if not _SAFE_NAME.fullmatch(name):
            raise TrafficError(f"{name!r} has characters that cannot go into a PromQL string")
    values = {
        "canaries": "|".join(n.replace(".", "[.]") for n in names),
        "group": group,
        "window": f"{max(1, math.ceil(window_seconds))}s",
    }
    return TEMPLATE.sub(lambda m: values[m.group(1)], query)


def parse_answer(body: bytes) -> float | None:
    """The one value of a Prometheus /api/v1/query answer; None when it holds no data."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise TrafficError(f"the answer is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise TrafficError("the answer is not a JSON object")
    if document.get("status") != "success":
        raise TrafficError(f"Prometheus answered {_error_text(document)}")
    data = document.get("data")
    if not isinstance(data, dict):
        raise TrafficError("the answer has no `data` object")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _sample_value(result)
    if kind != "vector":
        raise TrafficError(f"the query returned a {kind!r}; it must return one number")
    if not isinstance(result, list):
        raise TrafficError("the answer's vector is not a list")
    if not result:
        return None
    if len(result) > 1:
        labels = [s.get("metric") if isinstance(s, dict) else s for s in result[:3]]
        raise TrafficError(
            f"the query returned {len(result)} series (e.g. {_clip(json.dumps(labels))}); "
            "it must return one, e.g. wrap it in sum()"
        )
    series = result[0]
    if not isinstance(series, dict):
        raise TrafficError("a series of the answer is not an object")
    return _sample_value(series.get("value"))


def _sample_value(sample: Any) -> float | None:
    if not (isinstance(sample, list) and len(sample) == 2 and isinstance(sample[1], str)):
        raise TrafficError(f'a sample is not [time, "value"]: {_clip(repr(sample))}')
    if not _NUMBER.fullmatch(sample[1]):
        raise TrafficError(f"a sample value is not a number: {_clip(sample[1])!r}")
    value = float(sample[1])
    return None if math.isnan(value) else value


def _error_text(document: dict[str, Any]) -> str:
    kind, error = document.get("errorType"), document.get("error")
    return _clip(f"{kind}: {error}" if kind or error else f"status {document.get('status')!r}")


def _clip(text: str) -> str:
    return text if len(text) <= _ERROR_TEXT_CHARS else text[:_ERROR_TEXT_CHARS] + "..."


def judge(check: TrafficCheck, query: str, value: float | None) -> CheckResult:
    if value is None:
        return CheckResult(check.name, Outcome.NO_DATA, query, None, "the query returned no data")
    failed = (check.max is not None and value > check.max) or (
        check.min is not None and value < check.min
    )
    outcome = Outcome.FAIL if failed else Outcome.PASS
    return CheckResult(check.name, outcome, query, value, f"{value:g} ({check.threshold()})")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


class PrometheusClient:
    """Instant queries against one Prometheus server. Blocking."""

    def __init__(self, base_url: str, timeout_seconds: float) -> None:
        self._url = check_url(base_url) + "/api/v1/query"
        self._timeout = timeout_seconds
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def query(self, promql: str) -> float | None:
        deadline = time.monotonic() + self._timeout
        form = urllib.parse.urlencode({"query": promql, "timeout": f"{self._timeout:g}s"})
        request = urllib.request.Request(
            self._url,
            data=form.encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                return parse_answer(_read_bounded(response, deadline))
        except urllib.error.HTTPError as error:
            body = _read_bounded(error, deadline) if error.fp is not None else b""
            try:
                parse_answer(body)
            except TrafficError as detail:
                raise TrafficError(f"HTTP {error.code} from {self._url}: {detail}") from None
            raise TrafficError(f"HTTP {error.code} from {self._url}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or repr(error)
            raise TrafficError(f"cannot reach {self._url}: {reason}") from None


def _read_bounded(response: Any, deadline: float) -> bytes:
    """Each read waits at most the socket timeout; the deadline is checked between reads."""
    read = getattr(response, "read1", response.read)  # read1: whatever has arrived
    chunks: list[bytes] = []
    size = 0
    while chunk := read(64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise TrafficError(f"the answer is over {MAX_ANSWER_BYTES} bytes (MAX_ANSWER_BYTES)")
        if time.monotonic() > deadline:
            raise TrafficError("the answer took longer than timeout_seconds")
        chunks.append(chunk)
    return b"".join(chunks)


def evaluate(
    policy: TrafficPolicy,
    client: PrometheusClient,
    *,
    canaries: Iterable[str],
    group: str,
    window_seconds: float,
) -> list[CheckResult]:
    """Run every check once (blocking); a check that cannot run is an ERROR result."""
    canaries = list(canaries)
    results = []
    for check in policy.checks:
        query = check.query
        try:
            query = render(
                check.query, canaries=canaries, group=group, window_seconds=window_seconds
            )
            if not canaries and "canaries" in TEMPLATE.findall(check.query):
                results.append(
                    CheckResult(check.name, Outcome.NO_DATA, query, None, "no canary holds it")
                )
                continue
            results.append(judge(check, query, client.query(query)))
        except TrafficError as error:
            results.append(CheckResult(check.name, Outcome.ERROR, query, None, str(error)))
    return results
