"""Processes, read from /proc (Linux), and stopping a `tritonserver` with what it leaves behind.

One reader of /proc/PID/stat (`proc_stat`) serves everything here: a process's state, parent, CPU time
and start time. The start time tells a pid from its reuse, so every check that a process is still the
one we started takes it. The server harness (triton_server.py), the serving benchmark and the tests use
these to find a server's python-backend stubs, their CPU time and their shared-memory regions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ettin_export.serving.errors import TritonHarnessError

SHM_DIR = Path("/dev/shm")
SHM_BASE_PREFIX = "triton_python_backend_shm_region_"


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat used here (proc(5) numbers them from 1)."""

    state: str  # field 3: R, S, D, Z (zombie), X (dead), ...
    ppid: int  # field 4
    utime: int  # field 14, clock ticks in user mode
    stime: int  # field 15, clock ticks in kernel mode
    start_time: int  # field 22, clock ticks since boot


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat, or None when the process is gone. The command name (field 2) may hold spaces and
    parentheses, so the fields are counted after its last ')'."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return ProcStat(state=fields[0], ppid=int(fields[1]), utime=int(fields[11]), stime=int(fields[12]),
                        start_time=int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot: tells a pid from its reuse."""
    stat = proc_stat(pid)
    return stat.start_time if stat else None


def process_state(pid: int) -> str | None:
    stat = proc_stat(pid)
    return stat.state if stat else None


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """Running (not a zombie) and, when given, still the process that started at `start_time`."""
    stat = proc_stat(pid)
    if stat is None or stat.state in ("Z", "X"):
        return False
    return start_time is None or stat.start_time == start_time


def command_line(pid: int) -> list[str] | None:
    """The process's arguments (/proc/PID/cmdline; empty for a zombie), or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [argument.decode(errors="replace") for argument in raw.split(b"\0")[:-1]] if raw else []


def all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def descendants(pid: int) -> dict[int, int | None]:
    """pid -> start time of every live descendant (for a server: the python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for other in all_pids():
        stat = proc_stat(other)
        if stat is not None:
            children.setdefault(stat.ppid, []).append(other)
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = process_start_time(child)
        todo.extend(children.get(child, []))
    return found


def cpu_seconds(pids) -> float:
    """User + system CPU seconds these processes have used so far (those gone count nothing)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats = [proc_stat(pid) for pid in pids]
    return sum((stat.utime + stat.stime) / ticks for stat in stats if stat is not None)


def mapped_shm(pids) -> set[Path]:
    """The /dev/shm files that these processes have mapped: proof that a region is theirs."""
    regions = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
                path = path.removesuffix(" (deleted)")
                if path.startswith(f"{SHM_DIR}/{SHM_BASE_PREFIX}"):
                    regions.add(Path(path))
    return regions


def wait_exit(pid: int, start_time: int | None, timeout: float, popen: subprocess.Popen | None = None) -> bool:
    """Whether the process ended within `timeout` s (through `popen` when we are its parent: it is reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                return True
        elif not is_alive(pid, start_time):
            return True
        time.sleep(0.05)
    return popen.poll() is not None if popen is not None else not is_alive(pid, start_time)


def stop_server(pid: int, *, start_time: int | None = None, shm_prefix: str | None = None,
                grace: float = 15.0, popen: subprocess.Popen | None = None) -> dict:
    """SIGTERM to `pid` only, SIGKILL after `grace` s; then make sure its stubs and shm regions are gone.

    Stubs are killed only when they are descendants recorded before the signal (same start time), and
    shm regions are removed only when they carry this server's unique prefix or were mapped by it.
    Returns a report (JSON-able).
    """
    report: dict = {"pid": pid, "was_running": is_alive(pid, start_time), "signal": None,
                    "stubs_killed": [], "shm_removed": [], "shm_left": []}
    if report["was_running"]:
        program = (command_line(pid) or [""])[0]
        if Path(program).name != "tritonserver":
            raise TritonHarnessError(f"pid {pid} runs {program or 'something unreadable'}, not tritonserver; "
                                     "not signalling it.")
    if not report["was_running"]:
        if start_time is not None and is_alive(pid):
            report["note"] = f"pid {pid} is now a different process (start time differs); not signalled"
        if popen is not None:
            popen.poll()
    else:
        stubs = descendants(pid)
        owned_shm = mapped_shm([pid, *stubs])
        try:
            os.kill(pid, signal.SIGTERM)
        except PermissionError as exc:
            raise TritonHarnessError(f"Not permitted to signal tritonserver pid {pid} "
                                     f"(another user's server?): {exc}") from exc
        report["signal"] = "SIGTERM"
        if not wait_exit(pid, start_time, grace, popen):
            os.kill(pid, signal.SIGKILL)
            report["signal"] = "SIGKILL"
            wait_exit(pid, start_time, 10.0, popen)
        for stub, stub_start in stubs.items():  # a stub outlives a SIGKILLed server for a while
            if not wait_exit(stub, stub_start, 3.0, None):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stub, signal.SIGKILL)
                report["stubs_killed"].append(stub)
        report["shm_owned_at_stop"] = sorted(map(str, owned_shm))
        if shm_prefix:
            owned_shm |= set(SHM_DIR.glob(shm_prefix + "*"))
        for region in sorted(owned_shm):
            if region.exists():
                region.unlink(missing_ok=True)
                report["shm_removed"].append(str(region))
    report["exited"] = not is_alive(pid, start_time)
    leftovers = sorted(SHM_DIR.glob(SHM_BASE_PREFIX + "*")) if SHM_DIR.is_dir() else []
    report["shm_left"] = [str(p) for p in leftovers]  # other servers' regions: reported, never touched
    return report

