"""Which failed Publish calls xdsctl reports as "may have been stored" (exit 3)."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import pytest

from controlplane.cli import publishing


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Stub:
    def __init__(self, failure: Failure) -> None:
        self.failure = failure

    def Publish(self, request: object, **_: object) -> None:
        raise self.failure


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.UNAVAILABLE, "Socket closed"),
        (grpc.StatusCode.UNAVAILABLE, "recvmsg:Connection reset by peer"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        (grpc.StatusCode.CANCELLED, "Cancelled"),
    ],
)
def test_a_call_that_may_have_reached_the_server_is_cut_off(
    code: grpc.StatusCode, details: str
) -> None:
    with pytest.raises(publishing.CutOffError) as caught:
        publishing._send(Stub(Failure(code, details)), (), object())
    assert caught.value.reason == f"{code.name.lower()}: {details}"


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Failed to connect to remote host: Connection refused",
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, "error[XDS008 unknown-cluster]: ..."),
        (grpc.StatusCode.UNAUTHENTICATED, "admin token missing"),
    ],
)
def test_a_call_that_never_connected_or_was_answered_is_not(
    code: grpc.StatusCode, details: str
) -> None:
    failure = Failure(code, details)
    with pytest.raises(Failure):
        publishing._send(Stub(failure), (), object())


def test_the_message_names_the_version_and_how_to_check() -> None:
    args = argparse.Namespace(group="edge", server="127.0.0.1:18001", directory=Path("cfg"))
    text = publishing.cut_off_text(args, "0123456789abcdef", "unavailable: Socket closed")
    assert text == (
        "the publish to group edge was sent to 127.0.0.1:18001, but no answer came back "
        "(unavailable: Socket closed): the snapshot may have been stored. Its version is "
        "0123456789abcdef; check with `xdsctl snapshots --group edge`. Publishing cfg again "
        'is safe: if it was stored, the answer is "unchanged".'
    )
