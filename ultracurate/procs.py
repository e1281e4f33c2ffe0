"""Which process a job is, and whether it still lives.

Several ultracurate processes work on one workspace at once (a job and its readers; two jobs on
disjoint rows), so whatever a process leaves behind (a run marked running, a partial media file)
carries the process that made it: its host, its pid, and the pid's start time, so that a pid the
system has since given to another process does not pass for the job. Only a process of this
host can be checked; one of another host counts as alive until its last sign of life is older
than `STALE_AFTER` seconds.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import socket

STALE_AFTER = 6 * 3600.0   # another host's job with no commit for this long counts as dead


@functools.lru_cache(maxsize=1)
def host() -> str:
    return socket.gethostname()


def _start_time(pid: int) -> str | None:
    """The process's start time as the kernel records it (Linux: clock ticks since boot, field
    22 of /proc/PID/stat), or None where /proc has no such process or no /proc exists.
    A zombie (killed, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold spaces or ')'
    fields = text[text.rfind(")") + 2:].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def identity() -> tuple[int, str, str | None]:
    """(pid, host, start time) of this process."""
    pid = os.getpid()
    return pid, host(), _start_time(pid)


def alive(pid: int | None, on_host: str | None, started: str | None,
          last_seen: _dt.datetime | None = None, now: _dt.datetime | None = None) -> bool:
    """Whether the process (pid, host, start time) still runs. A process of another host is
    alive until last_seen (its last heartbeat, UTC) is older than STALE_AFTER."""
    if pid is None:
        return False
    if on_host != host():
        if last_seen is None:
            return True
        now = now or _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
        return (now - last_seen).total_seconds() < STALE_AFTER
    if os.path.isdir("/proc/self"):
        current = _start_time(int(pid))
        return current is not None and (started is None or current == started)
    try:  # no /proc: the pid alone
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tag() -> str:
    """This process in a file name: 'HOST~PID~START' (see `tag_alive`)."""
    pid, h, started = identity()
    return f"{_safe(h)}~{pid}~{started or 0}"


def tag_alive(name: str) -> bool:
    """Whether the process whose `tag()` begins the file name still runs. A name without a
    tag was left by an older ultracurate, whose jobs held the catalog alone (gone); another
    host's process cannot be checked (alive)."""
    parts = name.split("~", 3)
    if len(parts) < 4 or not parts[1].isdigit():
        return False
    if parts[0] != _safe(host()):
        return True
    return alive(int(parts[1]), host(), None if parts[2] == "0" else parts[2])


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)
