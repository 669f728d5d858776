"""Loading only the protobuf types a config names gives what loading every one gives.

`xdsctl publish` and `validate` no longer import all ~640 Envoy modules before they start
(resources.load_descriptors_for). Each check runs in a fresh interpreter: in this one, other
tests may have imported everything already, which would hide a type left unloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane import resources
from controlplane.config import snapshot_of
from controlplane.config.environments import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [
    (REPO / "examples" / "config", None),
    (REPO / "examples" / "config", "next"),
    (REPO / "examples" / "environments", "prod"),
    (REPO / "examples" / "environments", "staging"),
]


def fresh(code: str) -> dict:
    """Run `code` (which prints one JSON line) in a new interpreter; its answer."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(("directory", "env"), CONFIGS, ids=lambda v: str(v))
def test_a_config_loads_to_the_same_snapshot_with_only_the_types_it_names(
    directory: Path, env: str | None
) -> None:
    resources.load_all_descriptors()
    everything = snapshot_of(load_config(directory, env).resources)
    lazily = fresh(
        "import json, sys\n"
        "from controlplane.config import snapshot_of\n"
        "from controlplane.config.environments import load_config\n"
        f"s = snapshot_of(load_config({str(directory)!r}, {env!r}).resources)\n"
        "pb2 = [m for m in sys.modules if m.endswith('_pb2')]\n"
        "print(json.dumps({'version': s.version, 'modules': len(pb2)}))\n"
    )
    assert lazily["version"] == everything.version
    assert lazily["modules"] < resources.load_all_descriptors() / 2


def test_types_named_at_any_depth_of_serialized_anys_are_loaded() -> None:
    """A listener's HTTP connection manager (an Any) holds the router filter (an Any in it):
    both are found in the bytes, so the listener renders as JSON."""
    answer = fresh(
        "import json\n"
        "from google.protobuf import json_format\n"
        "from controlplane import resources\n"
        "from tests import factories\n"
        "listener = factories.edge_snapshot().resources(resources.LISTENER)\n"
        "body = next(iter(listener.values())).body\n"
        "resources.load_descriptors_within([body])\n"
        "message = resources.parse(resources.LISTENER, body)\n"
        "text = json.dumps(json_format.MessageToDict(message))\n"
        "print(json.dumps({'router': 'envoy.extensions.filters.http.router.v3.Router' in text}))\n"
    )
    assert answer == {"router": True}


def test_a_type_is_found_by_its_package_nested_or_not_and_an_unknown_one_is_not() -> None:
    answer = fresh(
        "import json\n"
        "from controlplane import resources\n"
        "names = ['envoy.extensions.filters.http.ratelimit.v3.RateLimit',\n"
        "         'envoy.config.route.v3.RouteAction.HashPolicy.Header',\n"
        "         'xds.type.v3.TypedStruct']\n"
        "found = [resources.message_class_for('type.googleapis.com/' + n).DESCRIPTOR.full_name\n"
        "         for n in names]\n"
        "try:\n"
        "    resources.message_class_for('type.googleapis.com/envoy.nothing.v3.Nothing')\n"
        "    unknown = None\n"
        "except resources.UnknownTypeError as error:\n"
        "    unknown = str(error)\n"
        "print(json.dumps({'found': found, 'unknown': unknown}))\n"
    )
    assert answer["found"] == [
        "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
        "envoy.config.route.v3.RouteAction.HashPolicy.Header",
        "xds.type.v3.TypedStruct",
    ]
    assert answer["unknown"] == "unknown type 'type.googleapis.com/envoy.nothing.v3.Nothing'"
