"""How the README runner reads a section: the commands of its ```sh blocks, as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.readme_runner import WalkthroughError, section_commands

README = Path(__file__).resolve().parents[2] / "README.md"

DOC = """# Title

## Setup

```sh
make   # a comment stays part of its command
# a line that is only a comment is no command

tool serve --port 1 \\
     --verbose
```

```yaml
not: a command
```

### A subsection belongs to its section

```bash
tool status
```

## Next

```sh
not in the section
```
"""


def test_commands_of_a_section_are_its_sh_lines_with_continuations_joined() -> None:
    assert section_commands(DOC, "Setup") == [
        "make   # a comment stays part of its command",
        "tool serve --port 1 \\\n     --verbose",
        "tool status",
    ]


def test_a_missing_heading_or_an_empty_section_is_refused() -> None:
    with pytest.raises(WalkthroughError, match="no heading 'Missing'"):
        section_commands(DOC, "Missing")
    with pytest.raises(WalkthroughError, match="has no ```sh commands"):
        section_commands("## Empty\n\ntext\n", "Empty")
    with pytest.raises(WalkthroughError, match="not closed"):
        section_commands("## Open\n\n```sh\nls\n", "Open")


def test_the_readme_quick_start_is_the_five_commands_the_quick_start_test_runs() -> None:
    commands = section_commands(README.read_text(), "The two commands")
    assert [c.split()[:2] for c in commands] == [
        ["bash", "scripts/serve-example"],
        ["bash", "scripts/test"],
        [".tools/envoy/envoy/_bin/envoy", "-c"],
        ["curl", "-H"],
        [".venv/bin/xdsctl", "status"],
    ]
