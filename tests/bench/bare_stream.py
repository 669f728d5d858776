"""What an idle gRPC stream costs a grpc.aio server that does nothing else, for comparison.

    python -m tests.bench.bare_stream [--streams N] [--reply-bytes B] [--channels C]

The server here echoes each request with one reply of B bytes from a generic stream-stream
handler: no protocol, no state of its own. A client process opens N streams over C channels
(as the bench's simulated fleet does), sends one request on each, reads the reply and then
holds every stream open. The server's resident memory is read before the client starts and
once it has settled; the difference over N is the cost of an idle stream to gRPC itself
(its C core, the call's Python objects and the handler's task), the least any xDS server on
grpc.aio can pay per Envoy. It prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator

import grpc

SERVICE, METHOD = "bench.Bare", "Stream"
SETTLE_SECONDS = 2.0  # after the last stream is open: what the server frees settles
CLIENT_READY_TIMEOUT_SECONDS = 300.0
MAX_STREAMS = 100_000  # one client process; more would exhaust its file and memory limits
_READY = b"ready\n"


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def serve(streams: int, reply_bytes: int, channels: int) -> dict[str, float]:
    reply = b"x" * reply_bytes

    async def echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield reply

    server = grpc.aio.server(options=[("grpc.server.max_pending_requests", MAX_STREAMS)])
    handler = grpc.stream_stream_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = None
    try:
        before = rss_kib()
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bench.bare_stream",
            "--client",
            str(port),
            "--streams",
            str(streams),
            "--channels",
            str(channels),
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdout is not None
        line = await asyncio.wait_for(client.stdout.readline(), CLIENT_READY_TIMEOUT_SECONDS)
        if line != _READY:
            raise RuntimeError(f"the client did not open its streams (said {line!r})")
        await asyncio.sleep(SETTLE_SECONDS)
        after = rss_kib()
    finally:
        if client is not None and client.returncode is None:
            client.kill()
            await client.wait()
        await server.stop(0)
    return {
        "streams": streams,
        "reply_bytes": reply_bytes,
        "channels": channels,
        "rss_before_kib": before,
        "rss_idle_kib": after,
        "per_stream_kib": round((after - before) / streams, 2),
    }


async def hold_streams(port: int, streams: int, channels: int) -> None:
    opened = [
        # a distinct argument per channel, so that each gets its own connection
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("bench.channel", k)])
        for k in range(channels)
    ]
    calls = []
    for index in range(streams):
        call = opened[index % channels].stream_stream(f"/{SERVICE}/{METHOD}")()
        await call.write(b"hello")
        calls.append(call)
    for call in calls:
        await call.read()
    sys.stdout.buffer.write(_READY)
    sys.stdout.flush()
    await asyncio.Event().wait()  # until the server's side kills this process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--reply-bytes", type=int, default=5000)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.streams <= MAX_STREAMS:
        parser.error(f"--streams must be 1 to {MAX_STREAMS:,}")
    if not 1 <= args.channels <= args.streams:
        parser.error("--channels must be 1 to --streams")
    if args.reply_bytes < 0:
        parser.error("--reply-bytes must be 0 or more")
    if args.client is not None:
        asyncio.run(hold_streams(args.client, args.streams, args.channels))
        return
    print(json.dumps(asyncio.run(serve(args.streams, args.reply_bytes, args.channels))))


if __name__ == "__main__":
    main()
