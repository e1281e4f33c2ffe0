"""The run ledger seen from beside the jobs: which runs are alive, how far each is, and which
died without closing their run.

A row stage commits each batch's rows with its run's counters (rows_done, rows_failed) and a
heartbeat (heartbeat_at), so a reader sees a job's progress as of its last commit. A run marked
running whose process is gone (ultracurate.procs) is shown as killed here, and closed as killed
in the ledger by the next job that starts (`close_dead`); a live job's run is never closed.

    rows = list_runs(cat, states=["running"], limit=10)
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Iterable

from . import procs
from .catalog import Catalog, named_queries, now
from .errors import UltracurateError

STATES = ("running", "completed", "interrupted", "killed", "failed")


def _dead(row: dict, own: Iterable[int], at: _dt.datetime) -> bool:
    pid, host = row["pid"], row["host"]
    if pid is None:  # before migration 010 a job held the catalog alone: not running now
        return True
    if (pid, host) == (procs.identity()[0], procs.host()):
        return row["run_id"] not in own   # this process's, and it no longer runs it
    return not procs.alive(pid, host, row["proc_start"], row["heartbeat_at"], at)


def dead_runs(cat: Catalog, own: Iterable[int] = ()) -> list[int]:
    """The runs marked running whose process is gone; `own`: the runs this process has open
    (its other runs marked running were left by it and are dead too)."""
    at = now()
    own = set(own)
    return sorted(r["run_id"] for r in cat.query(named_queries("runs")["running"])
                  if _dead(r, own, at))


def live_runs(cat: Catalog, own: Iterable[int] = ()) -> list[int]:
    """The runs marked running whose process still runs."""
    at = now()
    own = set(own)
    return sorted(r["run_id"] for r in cat.query(named_queries("runs")["running"])
                  if not _dead(r, own, at))


def close_dead(cat: Catalog, own: Iterable[int] = ()) -> list[int]:
    """Close the dead runs (see dead_runs) as killed; inside the caller's transaction."""
    dead = dead_runs(cat, own)
    if dead:
        cat.con.execute(named_queries("runs")["close_dead"], [dead])
    return dead


LIMIT = 20  # runs listed by default


def list_runs(cat: Catalog, states: Iterable[str] | None = None, limit: int | None = LIMIT,
              own: Iterable[int] = ()) -> list[dict]:
    """The newest runs (at most limit; None: all) of the given states, as dicts: the
    ledger's fields plus elapsed_s, rate (rows per second over the committed rows), eta_s
    (running runs) and the selection and options parsed. A running run whose process is gone
    is listed as killed."""
    states = list(states) if states else None
    for s in states or ():
        if s not in STATES:
            raise UltracurateError(f"unknown run state '{s}' ({', '.join(STATES)})")
    # a killed job may still be marked running: read both, then tell them apart
    wide = sorted(set(states) | ({"running"} if "killed" in states else set())) \
        if states else None
    at = now()
    own = set(own)
    out = []
    for r in cat.query(_list_sql(cat), {"states": wide}):
        if r["state"] == "running" and _dead(r, own, at):
            r["state"] = "killed"
            r["ended_at"] = r["heartbeat_at"] or r["started_at"]
        if states and r["state"] not in states:
            continue
        out.append(_view(r, at))
        if limit is not None and len(out) >= limit:
            break
    return out


# columns later migrations added: a catalog an older ultracurate wrote, opened read-only (which
# never migrates), lists them as unknown
_LATER = {"parent_run": "BIGINT", "pid": "BIGINT", "host": "VARCHAR", "proc_start": "VARCHAR",
          "heartbeat_at": "TIMESTAMP"}


def _list_sql(cat: Catalog) -> str:
    sql = named_queries("runs")["list"]
    missing = [c for c in _LATER if c not in set(cat.columns("runs"))]
    if missing:
        added = ", ".join(f"NULL::{_LATER[c]} AS {c}" for c in missing)
        sql = sql.replace("FROM runs", f"FROM (SELECT *, {added} FROM runs) runs", 1)
    return sql


def _view(r: dict, at: _dt.datetime) -> dict:
    done, failed = (int(r[k] or 0) for k in ("rows_done", "rows_failed"))
    # a running job's total is known once its pending rows are all read (runner.Pending)
    total = None if r["rows_in"] is None else int(r["rows_in"])
    start = r["started_at"]
    end = r["ended_at"] if r["state"] != "running" else at
    elapsed = max((end - start).total_seconds(), 0.0) if start and end else None
    # the rate over what is committed: up to the last commit for a running job
    last = r["heartbeat_at"] if r["state"] == "running" else end
    span = (last - start).total_seconds() if last and start else 0.0
    rate = (done + failed) / span if span > 0 and done + failed else None
    eta = None
    if r["state"] == "running" and rate and total is not None:
        eta = max(total - done - failed, 0) / rate
    return {
        "run_id": r["run_id"], "stage": r["stage"], "state": r["state"],
        "rows_done": done, "rows_failed": failed, "rows_total": total,
        "rate": round(rate, 3) if rate else None,
        "elapsed_s": round(elapsed, 1) if elapsed is not None else None,
        "eta_s": round(eta, 1) if eta is not None else None,
        "started_at": _iso(start), "ended_at": _iso(r["ended_at"]),
        "last_commit_at": _iso(r["heartbeat_at"]),
        "pid": r["pid"], "host": r["host"], "engine": r["engine"],
        "parent_run": r["parent_run"], "message": r["message"],
        "selection": _json(r["selection"]), "options": _json(r["params"]),
    }


def _iso(t) -> str | None:
    return t.isoformat(sep=" ", timespec="seconds") if t is not None else None


def _json(text):
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


# -- for a person ------------------------------------------------------------------------------
def _duration(s: float | None) -> str:
    if s is None:
        return "--"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _selection_text(sel) -> str:
    if not isinstance(sel, dict):
        return ""
    parts = []
    if sel.get("where"):
        parts.append(str(sel["where"]))
    for k in ("limit", "sample"):
        if sel.get(k) is not None:
            parts.append(f"{k} {sel[k]}")
    if sel.get("parent"):
        parts.append(_selection_text(sel["parent"]))
    return "; ".join(p for p in parts if p)


def _options_text(opts) -> str:
    if not isinstance(opts, dict):
        return ""
    shown = {k: v for k, v in opts.items()
             if v not in (None, False, [], {}) and k not in ("plan", "items")}
    return " ".join(f"{k}={v}" for k, v in shown.items())


def runs_table(rows: list[dict], title: str | None = None):
    """The runs for a person (a rich renderable): a table of the figures, then each run's
    selection and options on a line of their own (they are long; the figures stay aligned
    at any terminal width)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    t = Table(title=title, title_justify="left", expand=False, pad_edge=False,
              box=box.SIMPLE_HEAD, padding=(0, 1))
    for name, justify in (("run", "right"), ("stage", "left"), ("state", "left"),
                          ("done/total", "right"), ("failed", "right"), ("rate", "right"),
                          ("elapsed", "right"), ("ETA", "right")):
        t.add_column(name, justify=justify, no_wrap=True)
    colour = {"running": "cyan", "completed": "green", "killed": "red", "failed": "red",
              "interrupted": "yellow"}
    details = []
    for r in rows:
        t.add_row(str(r["run_id"]), r["stage"],
                  f"[{colour.get(r['state'], 'white')}]{r['state']}[/]",
                  f"{r['rows_done']}/{'?' if r['rows_total'] is None else r['rows_total']}",
                  str(r["rows_failed"] or ""),
                  f"{r['rate']:.1f}/s" if r["rate"] else "--",
                  _duration(r["elapsed_s"]),
                  _duration(r["eta_s"]) if r["state"] == "running" else "")
        what = "; ".join(x for x in (_selection_text(r["selection"]),
                                     _options_text(r["options"])) if x)
        if what:
            details.append(Text(f"run {r['run_id']}: {what}", overflow="ellipsis",
                                no_wrap=True))
    return Group(t, *details)
