"""No log line carries a PEM private key, however deep in the event it sits."""

from __future__ import annotations

import json

import structlog

from controlplane.observability import logging as obs_logging
from controlplane.redaction import REDACTED_PRIVATE_KEY
from tests import factories

KEY = factories.key_pair().private_key


def test_the_processor_scrubs_every_string_of_an_event() -> None:
    event = {
        "event": f"nack {KEY}",
        "error": "clipped " + KEY[:60],
        "nested": {"texts": [KEY, ("quoted", KEY)], "count": 3},
        "certificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    }
    scrubbed = obs_logging.redact_private_keys(None, "warning", event)
    assert scrubbed == {
        "event": f"nack {REDACTED_PRIVATE_KEY}\n",
        "error": f"clipped {REDACTED_PRIVATE_KEY}",
        "nested": {
            "texts": [f"{REDACTED_PRIVATE_KEY}\n", ["quoted", f"{REDACTED_PRIVATE_KEY}\n"]],
            "count": 3,
        },
        "certificate": event["certificate"],
    }


def test_configured_logs_never_print_a_private_key(capsys) -> None:
    obs_logging.configure("info", json=True)
    try:
        log = structlog.get_logger("test")
        log.warning("nack", node_id="envoy-1", error=f"invalid secret: {KEY}")
        try:
            raise ValueError(f"cannot load {KEY}")
        except ValueError:
            log.exception("failed")
    finally:
        structlog.reset_defaults()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    nack, failed = (json.loads(line) for line in lines)
    assert nack["error"] == f"invalid secret: {REDACTED_PRIVATE_KEY}\n"
    assert REDACTED_PRIVATE_KEY in failed["exception"]
    assert "PRIVATE KEY-----" not in "".join(lines)
    assert KEY.splitlines()[1] not in "".join(lines)
