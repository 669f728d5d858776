"""The stream event counters (observability.metrics.StreamEvents): plain numbers that the
scrape reads, exposed as the Prometheus counters they replace."""

from __future__ import annotations

from controlplane.observability.metrics import Metrics

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def samples(metrics: Metrics, prefix: str) -> list[str]:
    text = metrics.exposition().decode()
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_stream_events_are_scraped_as_counters_by_type_and_group() -> None:
    metrics = Metrics()
    edge = metrics.stream_events.of(CDS, "edge")
    edge.pushes += 2
    edge.pushed_bytes += 1234
    edge.acks += 1
    assert metrics.stream_events.of(CDS, "edge") is edge
    metrics.stream_events.of(CDS, "default").nacks += 3
    text = metrics.exposition().decode()
    assert "# TYPE xdscp_pushes_total counter" in text
    counted = {  # family -> (edge, default)
        "xdscp_pushes_total": (2, 0),
        "xdscp_pushed_bytes_total": (1234, 0),
        "xdscp_acks_total": (1, 0),
        "xdscp_nacks_total": (0, 3),
    }
    for name, (edge_count, default_count) in counted.items():
        assert samples(metrics, name) == [
            f'{name}{{group="edge",type_url="{CDS}"}} {edge_count:.1f}',
            f'{name}{{group="default",type_url="{CDS}"}} {default_count:.1f}',
        ]


def test_no_stream_event_series_before_a_stream_of_that_type_and_group_counts() -> None:
    assert samples(Metrics(), "xdscp_pushes_total") == []
