"""The wire: xDS stream state machines (sans-IO), the fleet registry, and the grpc.aio shell."""
