"""A proxyless gRPC client on gRPC's built-in xDS resolver, run as its own process.

gRPC reads GRPC_XDS_BOOTSTRAP once per process, so the test starts this script with the
variable set. Usage: `python grpc_xds_client.py TARGET METHOD MESSAGE TIMEOUT_S`.

It waits (bounded) for the channel to be ready, makes one unary call with a deadline, prints
`REPLY <hex of the reply>` then `READY`, and keeps the channel (and so its xDS stream) open
until stdin is closed, so the test can inspect the control plane while it is connected.
Each line the test writes to stdin meanwhile is one more call with that line as the message,
answered `REPLY <hex>` or `ERROR <code> <details>`.
Any failure of the first call is printed to stderr and the exit code is non-zero. If the
channel never becomes ready, one call that does not wait for it shows why: its error is
printed as `ERROR <code> <details>` (for an xDS target, the resolver's error) before exit 2.
"""

from __future__ import annotations

import sys

import grpc


def main(argv: list[str]) -> int:
    target, method, message, timeout = argv[0], argv[1], argv[2].encode(), float(argv[3])
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            print(f"channel to {target} not ready within {timeout}s", file=sys.stderr)
            try:
                channel.unary_unary(method)(message, timeout=timeout)
            except grpc.RpcError as error:
                print(f"ERROR {error.code()} {error.details()}", flush=True)
            return 2
        call = channel.unary_unary(method)  # bytes in, bytes out: no serializers
        try:
            reply = call(message, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as error:
            print(f"RPC failed: {error.code()} {error.details()}", file=sys.stderr)
            return 3
        print(f"REPLY {reply.hex()}", flush=True)
        print("READY", flush=True)
        for line in sys.stdin:  # until the test closes our stdin (or its process ends)
            try:
                reply = call(line.rstrip("\n").encode(), timeout=timeout, wait_for_ready=True)
            except grpc.RpcError as error:
                print(f"ERROR {error.code()} {error.details()}", flush=True)
                continue
            print(f"REPLY {reply.hex()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
