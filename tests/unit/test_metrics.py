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
    assert samples(metrics, "xdscp_pushes_total") == [
        f'xdscp_pushes_total{{group="edge",type_url="{CDS}"}} 2.0',
        f'xdscp_pushes_total{{group="default",type_url="{CDS}"}} 0.0',
    ]
    assert samples(metrics, "xdscp_pushed_bytes_total") == [
        f'xdscp_pushed_bytes_total{{group="edge",type_url="{CDS}"}} 1234.0',
        f'xdscp_pushed_bytes_total{{group="default",type_url="{CDS}"}} 0.0',
    ]
    assert samples(metrics, "xdscp_acks_total") == [
        f'xdscp_acks_total{{group="edge",type_url="{CDS}"}} 1.0',
        f'xdscp_acks_total{{group="default",type_url="{CDS}"}} 0.0',
    ]
    assert samples(metrics, "xdscp_nacks_total") == [
        f'xdscp_nacks_total{{group="edge",type_url="{CDS}"}} 0.0',
        f'xdscp_nacks_total{{group="default",type_url="{CDS}"}} 3.0',
    ]


def test_no_stream_event_series_before_a_stream_of_that_type_and_group_counts() -> None:
    assert samples(Metrics(), "xdscp_pushes_total") == []
