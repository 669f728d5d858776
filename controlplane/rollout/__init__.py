"""Rollout: the canary gate, the fresh Envoy probe, promotion and rollback."""
