"""Run a README section's shell commands verbatim, as a new user would, in a fresh clone.

`Walkthrough.of_head(tmp_path)` clones this checkout's HEAD (committed work only) and runs
commands there with cwd = the clone, in a network namespace of its own (`unshare --net`, then
`nsenter` for each command), so the README's fixed ports (18000-18002, 10080, 8081...) never
meet another test's. The commands are taken from the ```sh blocks under one heading, exactly
as written (a line ending in `\\` goes on to the next). A command that does not exit (a
server, Envoy) is named in `long_running` with a readiness command; it runs in the
background, in a process group of its own, until the walkthrough closes: then it gets SIGTERM,
and whatever of its group is still alive after `STOP_TIMEOUT` is reported and killed.

So that `scripts/setup` is quick and never touches another venv, the clone gets a `.venv` of
its own laid over the running interpreter's: its site-packages holds a path to the running
venv's (the dependencies), a path to the clone (the package, like an editable install), the
`xdsctl` console script, and the stamp `scripts/setup` writes after installing, so setup skips
pip and no package index is asked. `.tools` (Envoy) is a symlink to this checkout's.

    with Walkthrough.of_head(tmp_path) as walk:
        results = walk.run_section("The two commands", long_running={...}, skip=(...))
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT = 20.0  # seconds a long-running command has to exit after SIGTERM
READY_POLL = 0.25  # seconds between readiness checks
READY_CHECK_TIMEOUT = 30.0  # seconds one readiness check may take
MAX_OUTPUT = 1 << 20  # bytes of a command's output kept in its result
# The environment a new user's shell would not have: these would point the clone's commands
# at this checkout's code or another server.
SCRUBBED_ENV = ("PYTHONPATH", "VIRTUAL_ENV", "XDSCTL_SERVER", "XDSCTL_TOKEN", "XDSCTL_TOKEN_FILE")
_FENCE = re.compile(r"^```(\w*)\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


class WalkthroughError(AssertionError):
    """The walkthrough could not be run as written (not a command's own failure)."""


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_code: int | None  # None: a long-running command that was still running at the end
    stdout: str  # a long-running command's stdout and stderr, interleaved as written
    stderr: str = ""
    long_running: bool = False
    leftovers: tuple[str, ...] = ()  # processes of its group alive STOP_TIMEOUT after SIGTERM

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def section_commands(markdown: str, heading: str) -> list[str]:
    """The commands of the ```sh blocks under `heading` (up to the next heading of the same
    or a higher level), one per line, `\\` continuations joined; blank lines and lines that
    are only a comment are left out."""
    lines = markdown.splitlines()
    start = level = None
    for number, line in enumerate(lines):
        match = _HEADING.match(line)
        if match and match.group(2) == heading:
            start, level = number + 1, len(match.group(1))
            break
    if start is None or level is None:
        raise WalkthroughError(f"README has no heading {heading!r}")
    commands: list[str] = []
    fence: str | None = None
    pending = ""
    for line in lines[start:]:
        fence_match = _FENCE.match(line.strip())
        if fence is None:
            heading_match = _HEADING.match(line)
            if heading_match and len(heading_match.group(1)) <= level:
                break
            if fence_match:
                fence = fence_match.group(1)
            continue
        if fence_match and not fence_match.group(1):
            fence = None
            continue
        if fence not in ("sh", "bash", "shell"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending += "\n"
            continue
        if pending.strip() and not pending.strip().startswith("#"):
            commands.append(pending.strip())
        pending = ""
    if fence is not None:
        raise WalkthroughError(f"README section {heading!r}: a ``` block is not closed")
    if not commands:
        raise WalkthroughError(f"README section {heading!r} has no ```sh commands")
    return commands


class NetworkNamespace:
    """A network namespace with its loopback up, held open by a sleeping process."""

    def __init__(self) -> None:
        self._holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self._holder.pid}/ns/net") == own:
            if self._holder.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise WalkthroughError("`unshare --net` did not make a network namespace")
            time.sleep(0.02)
        self.prefix = ("nsenter", f"--net=/proc/{self._holder.pid}/ns/net", "--")
        subprocess.run([*self.prefix, "ip", "link", "set", "lo", "up"], check=True, timeout=10)

    def close(self) -> None:
        if self._holder.poll() is None:
            self._holder.kill()
        self._holder.wait(timeout=10)


@dataclass
class _Background:
    command: str
    process: subprocess.Popen[bytes]
    log: Path


class Walkthrough:
    """Commands run in `clone`, inside `namespace`; long-running ones stop at `close()`."""

    def __init__(self, clone: Path, namespace: NetworkNamespace) -> None:
        self.clone = clone
        self.namespace = namespace
        self.env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        self._background: list[_Background] = []
        self.stopped: list[CommandResult] = []  # the long-running commands, as they ended

    @classmethod
    def of_head(cls, workdir: Path, repo: Path = REPO) -> Walkthrough:
        """A fresh clone of `repo`'s HEAD under `workdir`, with `.venv` and `.tools` laid in."""
        clone = (workdir / "clone").resolve()
        head = _git(repo, "rev-parse", "HEAD").strip()
        _git(workdir, "clone", "--quiet", "--no-checkout", str(repo), str(clone))
        _git(clone, "fetch", "--quiet", str(repo), "HEAD")  # HEAD may be on no branch
        _git(clone, "checkout", "--quiet", "--detach", head)
        (clone / ".tools").symlink_to((repo / ".tools").resolve())
        _overlay_venv(clone)
        return cls(clone, NetworkNamespace())

    def __enter__(self) -> Walkthrough:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run_section(
        self,
        heading: str,
        *,
        long_running: Mapping[str, str] | None = None,
        skip: Iterable[str] = (),
        timeout: float = 120.0,
        readme: str = "README.md",
    ) -> list[CommandResult]:
        """Run the section's commands in order, each for at most `timeout` seconds.

        `long_running` maps a command prefix to a readiness command: a command starting with
        it (the longest such prefix) runs in the background until `close()`, and the walkthrough goes on once the
        readiness command exits 0 (within `timeout`). Commands starting with a prefix in
        `skip` are not run and have no result. A command's failure is its result's exit code,
        not an error: a walkthrough may show a command that fails.
        """
        long_running = dict(long_running or {})
        skipped = tuple(skip)
        results: list[CommandResult] = []
        for command in section_commands((self.clone / readme).read_text(), heading):
            if command.startswith(skipped):
                continue
            prefix = max((p for p in long_running if command.startswith(p)), key=len, default=None)
            ready = None if prefix is None else long_running[prefix]
            if ready is None:
                results.append(self.run(command, timeout=timeout))
            else:
                results.append(self.start(command, ready, timeout=timeout))
        return results

    def run(self, command: str, *, timeout: float = 120.0) -> CommandResult:
        """Run one command to its end in the clone and the namespace."""
        process = subprocess.Popen(
            [*self.namespace.prefix, "bash", "-c", command],
            cwd=self.clone,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the command and all it started
            stdout, stderr = process.communicate(timeout=10)
            raise WalkthroughError(
                f"`{command}` did not exit within {timeout}s:\n{_text(stdout + stderr)}"
            ) from None
        return CommandResult(command, process.returncode, _text(stdout), _text(stderr))

    def start(self, command: str, ready: str, *, timeout: float = 120.0) -> CommandResult:
        """Start a command that does not exit; return once `ready` exits 0 in the clone."""
        log = self.clone.parent / f"background-{len(self._background)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*self.namespace.prefix, "bash", "-c", command],
                cwd=self.clone,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._background.append(_Background(command, process, log))
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise WalkthroughError(
                    f"`{command}` exited with {process.returncode} before `{ready}` succeeded:"
                    f"\n{_text(log.read_bytes())}"
                )
            try:
                check = subprocess.run(
                    [*self.namespace.prefix, "bash", "-c", ready],
                    cwd=self.clone,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=READY_CHECK_TIMEOUT,
                )
                if check.returncode == 0:
                    return CommandResult(command, None, _text(log.read_bytes()), long_running=True)
                why = f"exited {check.returncode}: {_text(check.stdout + check.stderr)}"
            except subprocess.TimeoutExpired:
                why = f"did not exit within {READY_CHECK_TIMEOUT}s"
            if time.monotonic() > deadline:
                raise WalkthroughError(
                    f"`{command}` not ready after {timeout}s: `{ready}` {why}\n"
                    f"its output:\n{_text(log.read_bytes())}"
                )
            time.sleep(READY_POLL)

    def close(self) -> None:
        """Stop the long-running commands, last started first, then drop the namespace."""
        try:
            while self._background:
                self.stopped.append(_stop(self._background.pop()))
        finally:
            self.namespace.close()

    def result_of(self, prefix: str) -> CommandResult:
        """How a long-running command ended (after `close()`)."""
        return next(r for r in self.stopped if r.command.startswith(prefix))


def _stop(background: _Background) -> CommandResult:
    process = background.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT)
    group = process.pid  # start_new_session: the command leads its own process group
    leftovers = tuple(_group_members(group))
    if leftovers:
        os.killpg(group, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=10)
    return CommandResult(
        background.command,
        process.returncode,
        _text(background.log.read_bytes()),
        long_running=True,
        leftovers=leftovers,
    )


def _group_members(group: int) -> list[str]:
    """`PID COMMAND LINE` of every live process in process group `group`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # it exited while we looked
        if int(fields[2]) == group and fields[0] != "Z":
            words = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            members.append(f"{stat.parent.name} {words}")
    return members


def _overlay_venv(clone: Path) -> None:
    """`clone/.venv`: this interpreter's packages, the clone's own code, and setup's stamp."""
    venv = clone / ".venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / version / "site-packages"
    (site / "_xdscp_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "xdscp_checkout.pth").write_text(f"{clone}\n")
    script = venv / "bin" / "xdsctl"
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\n"
        "import sys\n"
        "from controlplane.cli.main import main\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    pyproject = hashlib.sha256((clone / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".xdscp-installed").write_text(f"{pyproject} {clone}\n")  # as scripts/setup writes


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise WalkthroughError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def _text(data: bytes) -> str:
    return data[-MAX_OUTPUT:].decode(errors="replace")
