"""Starting, stopping and asking after the hosted datasites' server processes.

Each server is detached (its own session, so closing the terminal does not stop it) and
keeps its pid file and log in its own directory; the log is appended to, never reset.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasites.deploy.config import MemberConfig
from datasites.deploy.serve import LOG_FILE, PID_FILE
from datasites.runtime.site_files import open_private

START_TIMEOUT_S = 180.0  # importing syft and opening the store: ~10-20 s on 2 cores
STOP_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """A server that cannot be started, reached or stopped; one line naming the site."""


@dataclass(frozen=True)
class ServerState:
    name: str
    url: str
    pid: int | None
    up: bool
    health: dict[str, Any] | None = None
    problem: str = ""


def get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def post_json(url: str, body: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def health(member: MemberConfig, timeout: float = 5.0) -> dict[str, Any] | None:
    """The server's health answer, or None if nothing (or something else) answers."""
    try:
        doc = get_json(f"{member.url}/fedsyft/v1/health", timeout)
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("site") == member.name else None


def require_up(member: MemberConfig) -> None:
    """:class:`ServerError` naming a site whose server does not answer its health check."""
    if health(member) is None:
        raise ServerError(f"site {member.name!r} does not answer at {member.url}; is it up? "
                          f"(fedsyft status --config ...)")


def _pid(directory: Path) -> int | None:
    try:
        return int((directory / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live fedsyft site server (not a zombie, not a reused pid)."""
    if pid is None:
        return False
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and b"datasites.deploy.serve" in cmdline
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def state(member: MemberConfig) -> ServerState:
    pid = _pid(member.directory)
    answer = health(member)
    if answer is not None:
        return ServerState(member.name, member.url, int(answer.get("pid") or 0) or pid, True,
                           answer)
    problem = "not running" if not _alive(pid) else f"process {pid} does not answer"
    return ServerState(member.name, member.url, pid if _alive(pid) else None, False,
                       problem=problem)


def _log_tail(directory: Path, since: int) -> str:
    """The last meaningful line the server logged since byte ``since``."""
    try:
        with open(directory / LOG_FILE, "rb") as fh:
            fh.seek(since)
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines()
                     if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:400]


def start(member: MemberConfig, timeout: float = START_TIMEOUT_S) -> ServerState:
    """Start the member's server unless it already answers; returns once it answers."""
    return start_all([member], timeout)[0]


def start_all(members: list[MemberConfig], timeout: float = START_TIMEOUT_S
              ) -> list[ServerState]:
    """Start every member's server that does not answer yet, all at once; returns once each
    answers (or raises :class:`ServerError` naming the first that did not start)."""
    states: dict[str, ServerState] = {}
    launched: dict[str, tuple[MemberConfig, subprocess.Popen, int]] = {}
    try:
        for m in members:
            current = state(m)
            if current.up:
                states[m.name] = current
                continue
            launched[m.name] = (m, *_launch(m, current))
        deadline = time.monotonic() + timeout
        while len(states) < len(members):
            for name, (m, proc, since) in launched.items():
                if name in states:
                    continue
                if proc.poll() is not None:
                    raise ServerError(f"site {m.name!r} did not start: "
                                      f"{_log_tail(m.directory, since)} (see "
                                      f"{m.directory / LOG_FILE})")
                answer = health(m, timeout=2.0)
                if answer is not None:
                    states[name] = ServerState(m.name, m.url, proc.pid, True, answer)
            if time.monotonic() > deadline:
                late = [n for n in launched if n not in states]
                raise ServerError(f"sites {late} did not answer within {timeout:.0f} s (see "
                                  "their server.log)")
            time.sleep(0.3)
    except BaseException:
        for name, (_, proc, _) in launched.items():
            if name not in states and proc.poll() is None:
                proc.terminate()
        raise
    return [states[m.name] for m in members]


def _launch(member: MemberConfig, current: ServerState) -> tuple[subprocess.Popen, int]:
    if current.pid is not None:
        raise ServerError(f"site {member.name!r}: process {current.pid} holds its directory "
                          f"but does not answer at {member.url}; stop it first "
                          "(fedsyft down)")
    if not port_free(member.host, member.port):
        raise ServerError(f"site {member.name!r}: port {member.port} on {member.host} is "
                          "already in use by another program (choose another port in the "
                          "config)")
    log_path = member.directory / LOG_FILE
    log_fd = open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    since = os.lseek(log_fd, 0, os.SEEK_END)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in [n for n in env if n.startswith("FEDSYFT_") and "PASSWORD" in n]:
        del env[name]  # the server never holds anyone's password
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "datasites.deploy.serve", str(member.directory),
             "--host", member.host, "--port", str(member.port)],
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env,
            start_new_session=True, cwd=member.directory)
    finally:
        os.close(log_fd)
    return proc, since


def stop(member: MemberConfig, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the member's server cleanly (SIGTERM, then SIGKILL after ``timeout``); returns
    whether one was running."""
    pid = _pid(member.directory)
    if not _alive(pid):
        (member.directory / PID_FILE).unlink(missing_ok=True) if pid else None
        return False
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        _reap(pid)
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    raise ServerError(f"site {member.name!r}: process {pid} did not stop within "
                      f"{timeout:.0f} s and was killed")


def _reap(pid: int) -> None:
    """Collect a server that was this process's child (tests start and stop them)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
