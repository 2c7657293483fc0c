"""Who listens on a TCP port, from /proc (Linux): so that a busy port is reported with the process that holds it,
and an HAProxy that Ray Serve left behind is named as such, with how to stop it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"  # the state column of /proc/net/tcp


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    parent: str = ""  # the parent process's command line ("" when it is init, or unknown)

    @property
    def is_serve_haproxy(self) -> bool:
        """Ray Serve's HAProxy (started by its HAProxy manager: `haproxy -db -f .../haproxy.cfg ...`)."""
        words = self.command.split()
        return bool(words) and os.path.basename(words[0]) == "haproxy" and "-f" in words and "haproxy" in self.command

    @property
    def config(self) -> Path | None:
        """The configuration file a Serve HAProxy was started with (`-f .../haproxy.cfg`)."""
        m = re.search(r"-f (\S*haproxy\.cfg)", self.command)
        return Path(m.group(1)) if m else None

    @property
    def node_id(self) -> str | None:
        """The Ray node whose HAProxy this is: Serve keeps each node's config in a folder named after it."""
        name = self.config.parent.name if self.config else ""
        return name if re.fullmatch(r"[0-9a-f]{16,}", name) else None

    @property
    def orphaned(self) -> bool:
        """No live Ray Serve owns it: its HAProxy manager (its parent) is gone, and so is its node's raylet."""
        return "HAProxyManager" not in self.parent and self.node_id not in live_nodes()

    def describe(self) -> str:
        command = " ".join(self.command.split())
        return f"pid {self.pid}: {command if len(command) <= 400 else command[:400] + ' ...'}"


def listening_inodes(port: int, proc: Path = Path("/proc")) -> set[str]:
    """The socket inodes listening on ``port`` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def holders(port: int, proc: Path = Path("/proc")) -> list[Holder]:
    """The processes with a socket listening on ``port`` that this user may look into (others are not listed)."""
    inodes = {f"socket:[{i}]" for i in listening_inodes(port, proc)}
    if not inodes:
        return []
    found = []
    for entry in _processes(proc):
        if inodes.intersection(_links(entry / "fd")):
            found.append(_holder(entry))
    return sorted(found, key=lambda h: h.pid)


def _links(fds: Path) -> list[str]:
    """What a process's file descriptors point at (none if it is gone or another user's)."""
    links = []
    try:
        for fd in fds.iterdir():
            try:
                links.append(os.readlink(fd))
            except OSError:  # closed while we looked
                continue
    except OSError:
        pass
    return links


def serve_haproxies(proc: Path = Path("/proc")) -> list[Holder]:
    """Every Ray Serve HAProxy process running on this machine that this user may see."""
    found = []
    for entry in _processes(proc):
        holder = _holder(entry)
        if holder.is_serve_haproxy:
            found.append(holder)
    return found


def _command(entry: Path) -> str:
    try:
        return (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _holder(entry: Path) -> Holder:
    try:
        ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        ppid = 0
    parent = _command(entry.parent / str(ppid)) if ppid > 1 else ""
    return Holder(int(entry.name), _command(entry) or "?", parent)


def _processes(proc: Path = Path("/proc")) -> list[Path]:
    return [entry for entry in proc.iterdir() if entry.name.isdigit()]


def live_nodes(proc: Path = Path("/proc")) -> set[str]:
    """The node ids of the raylets running on this machine."""
    nodes = set()
    for entry in _processes(proc):
        m = re.search(r"/raylet\s.*--node_id=([0-9a-f]+)", _command(entry))
        if m:
            nodes.add(m.group(1))
    return nodes


def stop_haproxies(node_id: str, grace: float = 5.0) -> list[Holder]:
    """Stop the HAProxy processes of Ray node ``node_id`` still running (SIGTERM, then SIGKILL after ``grace``
    seconds); the ones that were."""
    return _stop([h for h in serve_haproxies() if h.node_id == node_id], grace)


def stop_marked(
    name: str, value: str, session_dir: str | None = None, grace: float = 5.0, proc: Path = Path("/proc")
) -> list[Holder]:
    """Stop the processes, this one aside, whose environment holds ``name=value`` or that hold a file open
    under ``session_dir`` (a Ray session's; its processes write their logs there), with SIGTERM, then SIGKILL
    after ``grace`` seconds; the ones that were. A local Ray's processes inherit the environment of the one
    that started them, but those that rename themselves (``ray::DashboardAgent``) write over it, and over their
    command line: their open logs still say whose they are. (Only Ray's own: a user's ``tail -f`` of those logs
    is left alone.)"""
    marker = f"{name}={value}".encode()
    inside = session_dir.rstrip("/") + "/" if session_dir else None
    found = []
    for entry in _processes(proc):
        if int(entry.name) == os.getpid():
            continue
        if marker in _environ(entry) or (
            inside and _ray_named(entry) and any(link.startswith(inside) for link in _links(entry / "fd"))
        ):
            found.append(_holder(entry))
    return _stop(found, grace)


def _ray_named(entry: Path) -> bool:
    """A process that names itself as Ray's (``ray::...``, ``ray-dashboard-...``, Ray's binaries)."""
    first = _command(entry).split(" ")[0]
    return first.startswith(("ray::", "ray-")) or "/ray/" in first


def session_dir(name: str, value: str, proc: Path = Path("/proc")) -> str | None:
    """The session directory of the raylet whose environment holds ``name=value`` (``--session_dir=...``)."""
    for entry in _processes(proc):
        command = _command(entry)
        if os.path.basename(command.split(" ")[0]) == "raylet" and f"{name}={value}".encode() in _environ(entry):
            m = re.search(r"--session_dir=(\S+)", command)
            if m:
                return m.group(1)
    return None


def _environ(entry: Path) -> list[bytes]:
    try:
        return (entry / "environ").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's
        return []


def _stop(found: list[Holder], grace: float) -> list[Holder]:
    """SIGTERM each, then SIGKILL any still alive after ``grace`` seconds."""
    for h in found:
        _signal(h.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(h.pid) for h in found):
        time.sleep(0.1)
    for h in found:
        if _alive(h.pid):
            _signal(h.pid, signal.SIGKILL)
    return found


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
