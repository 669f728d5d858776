"""Operator config: Envoy v3 `resources:` files (YAML or JSON) in, checked Envoy messages out."""

from controlplane.config.loader import (
    ConfigError,
    ConfigProblem,
    Location,
    SourcedResource,
    load_directory,
    load_file,
    snapshot_of,
)

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "Location",
    "SourcedResource",
    "load_directory",
    "load_file",
    "snapshot_of",
]
