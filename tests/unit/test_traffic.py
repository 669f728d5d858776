"""Traffic checks without a network: templating, Prometheus' answer as hostile input, judging."""

from __future__ import annotations

import json
import math

import pytest

from controlplane.rollout.traffic import (
    MAX_QUERY_CHARS,
    CheckResult,
    Outcome,
    TrafficCheck,
    TrafficError,
    TrafficPolicy,
    check_query,
    check_url,
    evaluate,
    judge,
    parse_answer,
    render,
)


def answer(result: object, kind: str = "vector", status: str = "success") -> bytes:
    return json.dumps({"status": status, "data": {"resultType": kind, "result": result}}).encode()


def series(value: str, **labels: str) -> dict[str, object]:
    return {"metric": labels, "value": [1700000000.123, value]}


def test_canaries_become_a_regex_alternation_without_backslashes() -> None:
    query = 'rate(x{node=~"{{ canaries }}",g="{{group}}"}[{{ window }}])'
    rendered = render(query, canaries=["b.1", "a", "a"], group="edge", window_seconds=4.2)
    assert rendered == 'rate(x{node=~"a|b[.]1",g="edge"}[5s])'


def test_a_window_is_never_below_one_second() -> None:
    assert render("{{ window }}", canaries=[], group="g", window_seconds=0.0) == "1s"


@pytest.mark.parametrize("node_id", ['edge"} or vector(1) #', "a\\b", "a b", "a|b", ""])
def test_a_node_id_that_could_escape_its_promql_string_is_refused(node_id: str) -> None:
    with pytest.raises(TrafficError, match="cannot go into a PromQL string"):
        render("{{ canaries }}", canaries=[node_id], group="edge", window_seconds=1)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "the query is empty"),
        ("x{a=~'{{ nodes }}'}", "unknown placeholder(s) nodes; valid: canaries, group, window"),
        ("x{a=~'{{ canaries'}", "not of the form {{ name }}"),
        ("x" * (MAX_QUERY_CHARS + 1), f"over {MAX_QUERY_CHARS} characters"),
    ],
)
def test_bad_queries_are_refused_with_the_reason(query: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_query(query)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["ftp://prom:9090", "prometheus:9090", "http://", "http://u:p@prom:9090", "http://p/?q=1"],
)
def test_only_plain_http_base_urls_are_accepted(url: str) -> None:
    with pytest.raises(ValueError):
        check_url(url)


def test_a_base_url_loses_its_trailing_slash() -> None:
    assert check_url("http://127.0.0.1:9090/prom/") == "http://127.0.0.1:9090/prom"


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (answer([series("0.25")]), 0.25),
        (answer([series("+Inf")]), math.inf),
        (answer([1700000000, "3"], kind="scalar"), 3.0),
        (answer([]), None),  # no series: no data
        (answer([series("NaN")]), None),  # 0/0 with no traffic: no data
    ],
)
def test_a_usable_answer_gives_one_value_or_no_data(body: bytes, value: float | None) -> None:
    assert parse_answer(body) == value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>", "not JSON"),
        (b"[1]", "not a JSON object"),
        (
            json.dumps(
                {"status": "error", "errorType": "bad_data", "error": "parse error"}
            ).encode(),
            "Prometheus answered bad_data: parse error",
        ),
        (json.dumps({"status": "success", "data": []}).encode(), "no `data` object"),
        (answer([series("1", node="a"), series("2", node="b")]), "returned 2 series"),
        (answer([[1, "2"]], kind="matrix"), "returned a 'matrix'"),
        (answer({"x": 1}), "vector is not a list"),
        (answer(["x"]), "series of the answer is not an object"),
        (answer([{"metric": {}, "value": [1, 2]}]), 'not [time, "value"]'),
        (answer([series("1_000")]), "not a number"),
        (answer([series("infinity")]), "not a number"),
    ],
)
def test_an_unusable_answer_is_an_error_naming_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(TrafficError) as caught:
        parse_answer(body)
    assert message in str(caught.value)


def test_judge_compares_against_max_and_min() -> None:
    both = TrafficCheck(name="c", query="q", max=0.5, min=0.1)
    assert judge(both, "q", 0.3).outcome is Outcome.PASS
    assert judge(both, "q", 0.5).outcome is Outcome.PASS  # at the threshold is not over it
    over = judge(both, "q", 0.6)
    assert over.outcome is Outcome.FAIL and over.detail == "0.6 (max 0.5, min 0.1)"
    assert judge(both, "q", 0.0).outcome is Outcome.FAIL
    assert judge(both, "q", math.inf).outcome is Outcome.FAIL
    assert judge(both, "q", None).outcome is Outcome.NO_DATA


class FakePrometheus:
    def __init__(self, *answers: float | Exception | None) -> None:
        self.answers = list(answers)
        self.queries: list[str] = []

    def query(self, promql: str) -> float | None:
        self.queries.append(promql)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


POLICY = TrafficPolicy(
    prometheus="http://prom:9090",
    checks=(
        TrafficCheck(name="5xx", query='r{node=~"{{ canaries }}"}', max=0.05),
        TrafficCheck(name="up", query='up{group="{{ group }}"}', min=1),
    ),
)


def test_evaluate_runs_every_check_and_an_unreachable_prometheus_is_an_error_result() -> None:
    prometheus = FakePrometheus(0.01, TrafficError("cannot reach http://prom:9090: refused"))
    results = evaluate(
        POLICY,
        prometheus,  # type: ignore[arg-type]
        canaries=["c1"],
        group="edge",
        window_seconds=3,
    )
    assert prometheus.queries == ['r{node=~"c1"}', 'up{group="edge"}']
    assert results == [
        CheckResult("5xx", Outcome.PASS, 'r{node=~"c1"}', 0.01, "0.01 (max 0.05)"),
        CheckResult(
            "up", Outcome.ERROR, 'up{group="edge"}', None, "cannot reach http://prom:9090: refused"
        ),
    ]


def test_with_no_canary_on_the_candidate_a_canary_query_is_not_sent() -> None:
    prometheus = FakePrometheus(1.0)
    results = evaluate(
        POLICY,
        prometheus,  # type: ignore[arg-type]
        canaries=[],
        group="edge",
        window_seconds=3,
    )
    assert prometheus.queries == ['up{group="edge"}']
    assert [r.outcome for r in results] == [Outcome.NO_DATA, Outcome.PASS]
