"""Detached child processes, found again later by pid from another command invocation."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

# Popen objects of processes started by this interpreter: polling them reaps the exited
# ones, which would otherwise linger as zombies that still accept signals.
_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(cmd: list[str], log_path: Path) -> int:
    """Start `cmd` in its own session so that it outlives the CLI that started it and a
    Ctrl-C in that terminal does not reach it; stdout and stderr go to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _children[proc.pid] = proc
    return proc.pid


def is_running(pid: int, name: str) -> bool:
    """True if `pid` is alive and its command line mentions `name`. A recorded pid may have
    been reused by an unrelated process since; that one must never be signalled."""
    proc = _children.get(pid)
    if proc is not None:
        # Our own unreaped child cannot have a reused pid, and right after fork its
        # command line is still this interpreter's.
        if proc.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return name in _command_line(pid)


def stop(pid: int, name: str, timeout_s: float = 10.0) -> None:
    """SIGTERM (Tansu and Redis both exit promptly on it), SIGKILL if it is ignored."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not is_running(pid, name):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not is_running(pid, name):
                return
            time.sleep(0.05)
    raise RuntimeError(f"process {pid} ({name}) survived SIGKILL")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _command_line(pid: int) -> str:
    """The process's command line; empty for a zombie or a process that is gone."""
    proc_file = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            return proc_file.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            return ""
    # No procfs (macOS): ask ps.
    out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True)
    return out.stdout
