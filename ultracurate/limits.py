"""How far SQL run on the catalog may reach, and how long and how much memory a user's statement
(a `--where` predicate, an `ultracurate sql` query) may take.

Every catalog connection is opened with `duckdb_config()`: no file or network access (COPY,
EXPORT DATABASE, ATTACH, read_csv, INSTALL), no extension loaded or installed on demand (a cast
to INET would otherwise download one), the configuration locked so that SQL cannot undo any of
it (SET, RESET, LOAD), a memory limit for DuckDB's own buffers, and a bound on expression depth.
`ultracurate sql --allow-files` opens a read-only connection that may read files; the statement
check in the `sql` command keeps it from writing them.

A user's statement runs inside `bounded()`: a watchdog thread interrupts it past a deadline or
when the process grows by more than a memory cap (DuckDB's memory limit does not count what a
scalar function such as range() allocates). A statement that ignores the interrupt (DuckDB only
checks between chunks of rows) ends the CLI process after a grace period, or at once when it
grows past twice the cap, with the same one-line error. `bounded` wraps reads only.

Settings (environment variables, read when used):
    ULTRACURATE_MEMORY_LIMIT   DuckDB memory_limit of every connection (default: half the RAM)
    ULTRACURATE_SQL_TIMEOUT    seconds a user statement may run (default 120)
    ULTRACURATE_SQL_MEMORY     growth of the process a user statement may cause (default 2GB)
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time

from .errors import UltracurateError

MAX_EXPRESSION_DEPTH = 200      # DuckDB's parser refuses deeper expressions (800 NOTs)
DEFAULT_SQL_TIMEOUT = 120.0
DEFAULT_SQL_MEMORY = "2GB"
GRACE_SECONDS = 3.0             # after an interrupt DuckDB ignores, the CLI process ends
WATCH_INTERVAL = 0.05

# Set by the CLI: a statement that outlives its interrupt ends the process (a library caller
# keeps its process and waits for DuckDB instead).
HARD_EXIT = False

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str, what: str) -> int:
    """'2GB', '512MiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UltracurateError(f"{what}: '{text}' is not a size (e.g. 2GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_limit() -> str:
    """DuckDB's memory_limit for every catalog connection."""
    env = os.environ.get("ULTRACURATE_MEMORY_LIMIT")
    if env:
        return f"{parse_bytes(env, 'ULTRACURATE_MEMORY_LIMIT') // 2**20}MiB"
    ram = _ram_bytes()
    return f"{ram // 2 // 2**20}MiB" if ram else "4GiB"


def env_seconds(name: str, default: float, zero: bool = False) -> float:
    """A number of seconds from environment variable name (default when unset); anything
    else (not a number, negative, infinite, or 0 unless zero) is one clear error."""
    env = os.environ.get(name)
    if not env:
        return default
    try:
        value = float(env)
    except ValueError:
        value = float("nan")
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise UltracurateError(f"{name}: '{env}' is not a number of seconds")
    return value


def sql_timeout() -> float:
    return env_seconds("ULTRACURATE_SQL_TIMEOUT", DEFAULT_SQL_TIMEOUT)


def sql_memory() -> int:
    return parse_bytes(os.environ.get("ULTRACURATE_SQL_MEMORY") or DEFAULT_SQL_MEMORY,
                       "ULTRACURATE_SQL_MEMORY")


def duckdb_config(allow_files: bool = False) -> dict:
    """DuckDB settings of every catalog connection (see the module's docstring)."""
    return {
        "enable_external_access": bool(allow_files),
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "max_expression_depth": MAX_EXPRESSION_DEPTH,
        "memory_limit": memory_limit(),
        "lock_configuration": True,
    }


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@contextlib.contextmanager
def bounded(con, what: str):
    """Run the block's statements on con under the user-SQL time and memory bounds. A breach
    interrupts the statement and raises UltracurateError('<what> ...') naming the setting."""
    import duckdb
    seconds, cap = sql_timeout(), sql_memory()
    base = _rss()
    breach: list[str] = []
    done = threading.Event()

    def watch():
        deadline = time.monotonic() + seconds
        interrupted_at = None
        while not done.wait(WATCH_INTERVAL):
            now, rss = time.monotonic(), _rss()
            grown = rss - base if base is not None and rss is not None else 0
            if interrupted_at is None:
                if now > deadline:
                    breach.append(f"took longer than {seconds:g} s (ULTRACURATE_SQL_TIMEOUT)")
                elif grown > cap:
                    breach.append(f"needed more than {_human(cap)} of memory "
                                  "(ULTRACURATE_SQL_MEMORY)")
                if breach:
                    con.interrupt()
                    interrupted_at = now
            elif HARD_EXIT and (now - interrupted_at > GRACE_SECONDS or grown > 2 * cap):
                # DuckDB checks for an interrupt only between chunks of rows: a statement
                # still running (or still growing) after it ends the CLI process. Nothing has
                # been written: bounded() wraps reads only.
                sys.stderr.write(f"error: {what} {breach[0]}\n")
                sys.stderr.flush()
                os._exit(1)

    watcher = threading.Thread(target=watch, name="uc-sql-bound", daemon=True)
    watcher.start()
    try:
        yield
    except duckdb.Error as e:
        if breach:
            raise UltracurateError(f"{what} {breach[0]}") from None
        raise e
    finally:
        done.set()
        watcher.join()
