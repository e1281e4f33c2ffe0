"""Hardening (issue 11): no command destroys data, reaches outside the workspace, hangs or prints
a traceback, whatever a user types, a disk does or a tampered catalog holds.

The --where guard is tested through the library over a table of hostile predicates (each one
leaves the catalog's contents as they were), and through the CLI for a subset across every
command that takes --where; CLI tables run many command lines per subprocess (tests/_clirun.py)
to pay Python's imports once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from _clirun import one_line_error, run_many
from _scoring import add_candidates
from ultracurate.errors import SelectionError, UltracurateError, redact
from ultracurate.runner import run
from ultracurate.selection import Selection, selected_keys_sql
from ultracurate.workspace import Workspace

ULTRACURATE = str(Path(sys.executable).parent / "ultracurate")


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def hws(tmp_path_factory, demo_photos, tiny_dir) -> Workspace:
    """Anchors (the demo photos), 4 edits and 8 generated candidates with real images; the
    tiny checkpoints that stages check for before they read their selection."""
    from ultracurate.models import make_tiny
    make_tiny(tiny_dir, ("editor", "clip", "dino", "grounding", "sam"))
    from ultracurate.stages.ingest import IngestStage, discover
    ws = Workspace.init(tmp_path_factory.mktemp("hard") / "ws",
                        {"models": {"profile": "tiny", "tiny_dir": str(tiny_dir)}})
    run(ws, IngestStage(items=discover([demo_photos])), progress=False)
    add_candidates(ws, n_edits=4, per_edit=2)
    return ws


def contents(ws: Workspace) -> dict:
    """Row count and an order-free hash of every row, per table: equal before and after means
    nothing in the catalog changed."""
    with ws.catalog(read_only=True) as cat:
        tables = [r[0] for r in cat.con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "ORDER BY 1").fetchall()]
        return {t: cat.con.execute(f"SELECT count(*), sum(hash(x)) FROM {t} x").fetchone()
                for t in tables}


def tree(root: Path, skip: tuple[str, ...] = ("catalog.duckdb",)) -> dict:
    """Every file under root with its size (the catalog itself is compared by contents)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(skip)}


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the --where guard, through the library --------------------------------------------------
DEEP_NOT = "NOT " * 800 + "width > 1"
DEEP_PARENS = "(" * 300 + "width > 1" + ")" * 300

# (view, predicate, params, what the one-line error says)
HOSTILE = [
    # a second statement, or a clause that is not a predicate
    ("anchors_v", "1=1; DROP TABLE anchors", {}, r"not a valid SQL predicate|single SQL"),
    ("anchors_v", "1=1); DROP TABLE anchors; --", {}, r"not a valid SQL predicate|single SQL"),
    ("anchors_v", "1=1) ; COPY anchors TO '/tmp/uc-x.csv' ; SELECT (1", {},
     r"not a valid SQL predicate|single SQL"),
    ("anchors_v", "width > 0) UNION ALL (SELECT * FROM runs", {},
     r"not a valid SQL predicate|single SQL"),
    ("anchors_v", "1=1 GROUP BY width", {}, r"not a valid SQL predicate|single SQL"),
    ("anchors_v", "1=1 HAVING 1=1", {}, r"not a valid SQL predicate|single SQL"),
    ("anchors_v", "1=1 QUALIFY 1=1", {}, r"not a valid SQL predicate|single SQL"),
    ("anchors_v", "1=1 ORDER BY width", {}, r"not a valid SQL predicate|single SQL"),
    ("anchors_v", "1=1 LIMIT 1", {}, r"not a valid SQL predicate|single SQL"),
    ("anchors_v", "width >", {}, "not a valid SQL predicate"),
    ("anchors_v", "'unterminated", {}, "not a valid SQL predicate"),
    ("anchors_v", "width > 1 /*", {}, "not a valid SQL predicate"),
    # reading another relation
    ("anchors_v", "anchor_id IN (SELECT anchor_id FROM anchors)", {}, "subquery"),
    ("anchors_v", "EXISTS (SELECT 1)", {}, "subquery"),
    ("anchors_v", "(SELECT count(*) FROM runs) > 0", {}, "subquery"),
    ("anchors_v", "anchor_id IN (FROM anchors SELECT anchor_id)", {}, "subquery"),
    ("candidates_v", "candidate_id = ANY (SELECT key FROM stage_state)", {}, "subquery"),
    # aggregates, windows: a predicate tests one row at a time
    ("anchors_v", "sum(anchor_id) > 0", {}, r"sum\(\): it is an aggregate"),
    ("anchors_v", "count(*) > 0", {}, r"count_star\(\)|count\(\)|aggregate"),
    ("anchors_v", "max(width) > 0", {}, "aggregate"),
    ("candidates_v", "list(candidate_id) IS NOT NULL", {}, "aggregate"),
    ("anchors_v", "row_number() OVER () > 0", {}, "window function"),
    ("anchors_v", "rank() OVER (ORDER BY width) = 1", {}, "window function"),
    ("anchors_v", "sum(width) OVER () > 0", {}, "window function"),
    # volatile or side effects, by DuckDB's own classification
    ("anchors_v", "error('boom') IS NULL", {}, r"error\(\): DuckDB marks it volatile"),
    ("anchors_v", "random() < 0.5", {}, "volatile"),
    ("anchors_v", "setseed(0.5) IS NULL", {}, "volatile"),
    ("anchors_v", "nextval('x') > 0", {}, "volatile"),
    ("anchors_v", "uuid() IS NOT NULL", {}, "volatile"),
    ("edits_v", "gen_random_uuid() IS NOT NULL", {}, "volatile"),
    # table functions: files, queries, settings
    ("anchors_v", "read_csv('/etc/passwd') IS NULL", {}, "table function"),
    ("anchors_v", "read_text('/etc/hostname') IS NULL", {}, "table function"),
    ("anchors_v", "glob('*') IS NULL", {}, "table function"),
    ("anchors_v", "query('SELECT 1') IS NULL", {}, "table function"),
    ("anchors_v", "json_execute_serialized_sql(json_serialize_sql('SELECT 1')) IS NULL", {},
     "table function"),
    ("anchors_v", "duckdb_settings() IS NULL", {}, "table function"),
    # functions DuckDB does not have here (extensions are never loaded or installed)
    ("anchors_v", "getenv('HOME') IS NULL", {}, "fails in DuckDB"),
    ("anchors_v", "no_such_function(width) > 0", {}, "fails in DuckDB"),
    ("anchors_v", "st_point(1, 2) IS NULL", {}, "fails in DuckDB"),
    ("anchors_v", "'127.0.0.1'::INET IS NULL", {}, r"fails in DuckDB.*inet"),
    ("anchors_v", "width::INET IS NULL", {}, "fails in DuckDB"),
    ("anchors_v", "excel_text(width, '0.00') IS NULL", {}, "fails in DuckDB"),
    # columns the view lacks
    ("anchors_v", "no_such_column = 1", {}, "unknown column 'no_such_column'"),
    ("anchors_v", "edit_type = 'add'", {}, "unknown column 'edit_type'"),
    ("anchors_v", "runs.secret = 1", {}, "unknown column 'secret'"),
    # values DuckDB cannot use, found when the guard runs the predicate once
    ("edits_v", "CAST(edit_type AS INTEGER) = 1", {}, r"fails in DuckDB.*Conversion"),
    ("anchors_v", "sha256::BIGINT > 0", {}, "fails in DuckDB"),
    ("anchors_v", "width > 'abc'", {}, "fails in DuckDB"),
    ("candidates_v", "instruction::INTEGER > 0", {}, "fails in DuckDB"),
    # parameters: named, exact, typed by their place
    ("anchors_v", "width > ?", {}, "positional parameter"),
    ("anchors_v", "width > $1", {"1": "5"}, "positional parameter"),
    ("anchors_v", "width > $w", {}, r"parameter \$w with no value"),
    ("anchors_v", "width > :w", {"ww": "5"}, r"parameter \$w with no value"),
    ("anchors_v", "width > $w", {"w": "abc"}, "fails in DuckDB"),
    ("anchors_v", "width > $w", {"w": "9223372036854775808"}, "fails in DuckDB"),
    ("anchors_v", "$n + 1 > width", {"n": "5"}, "fails in DuckDB"),
    # depth: refused by DuckDB's parser, no RecursionError
    ("anchors_v", DEEP_NOT, {}, "nested too deeply"),
    ("anchors_v", DEEP_PARENS, {}, "nested too deeply"),
]


def test_the_hostile_table_is_large_enough():
    assert len(HOSTILE) >= 50


@pytest.mark.parametrize("view, predicate, params, message", HOSTILE,
                         ids=[f"{i:02d}" for i in range(len(HOSTILE))])
def test_hostile_predicates_are_refused_and_change_nothing(hws, view, predicate, params,
                                                          message):
    before = contents(hws)
    key = {"anchors_v": "anchor_id", "edits_v": "edit_id", "candidates_v": "candidate_id"}[view]
    with hws.catalog() as cat:  # a writable connection, as every stage holds
        with pytest.raises(SelectionError, match=message) as info:
            sql, p = selected_keys_sql(cat.con, view, key, Selection(predicate, params))
            cat.con.execute(sql, p).fetchall()
    assert "\n" not in str(info.value)
    assert contents(hws) == before


def test_good_predicates_bind_parameters_by_exact_name_and_the_columns_type(hws):
    def ids(where, params=None, view="anchors_v", key="anchor_id"):
        with hws.catalog(read_only=True) as cat:
            sql, p = selected_keys_sql(cat.con, view, key, Selection(where, params or {}),
                                       columns=key)
            return sorted(r[0] for r in cat.con.execute(sql, p).fetchall())

    with hws.catalog(read_only=True) as cat:
        wide = sorted(r[0] for r in cat.con.execute(
            "SELECT anchor_id FROM anchors WHERE width > 600").fetchall())
    assert 0 < len(wide) < 9
    # text from the command line is cast to the column's type; numbers stay numbers
    assert ids("width > $w", {"w": "600"}) == wide == ids("width > :w", {"w": 600})
    # $ab and $a are two names: only the one the predicate uses is bound
    assert ids("width > $ab", {"a": "1", "ab": "600"}) == wide
    assert ids("width > $a", {"a": "600", "ab": "1"}) == wide
    # against a text column a value stays text, whatever it looks like
    assert ids("external_id = $t", {"t": "nan"}) == []
    assert ids("sha256 = $o", {"o": "10"}) == []
    assert ids("external_id = $x", {"x": "coffee' OR '1'='1"}) == []
    # lambdas, stable time functions and CASE are predicates like any other
    assert len(ids("len(list_filter(captions, lambda c: c LIKE '%a%')) >= 0")) == 9
    assert len(ids("ingested_at < now() + INTERVAL 1 DAY")) == 9
    assert ids("CASE WHEN width > 600 THEN true ELSE false END") == wide


def test_a_predicate_past_the_time_bound_is_interrupted(tmp_path, monkeypatch):
    """A predicate that would run for minutes is interrupted at ULTRACURATE_SQL_TIMEOUT."""
    ws = Workspace.init(tmp_path / "big")
    with ws.catalog() as cat:  # 40k anchors, written straight into the catalog
        cat.con.execute(
            "INSERT INTO anchors (anchor_id, sha256, media, source_path, width, height) "
            "SELECT i, md5(i::VARCHAR), md5(i::VARCHAR) || '.jpg', 'p' || i, 1, 1 "
            "FROM range(1, 40001) t(i)")
    monkeypatch.setenv("ULTRACURATE_SQL_TIMEOUT", "0.3")
    slow = "levenshtein(repeat(sha256, 8), repeat(source_path, 60)) >= 0"
    with ws.catalog(read_only=True) as cat:
        with pytest.raises(SelectionError, match=r"took longer than 0.3 s "
                                                 r"\(ULTRACURATE_SQL_TIMEOUT\)"):
            selected_keys_sql(cat.con, "anchors_v", "anchor_id", Selection(slow))
        # the connection is usable afterwards
        assert cat.scalar("SELECT count(*) FROM anchors") == 40000
        # a predicate ultracurate wrote itself is checked but not run under the user bounds
        selected_keys_sql(cat.con, "anchors_v", "anchor_id", Selection(scope=(slow,)))
        with pytest.raises(SelectionError, match="volatile"):
            selected_keys_sql(cat.con, "anchors_v", "anchor_id",
                              Selection(scope=("random() < 0.5",)))


# -- the --where guard, through the CLI ------------------------------------------------------
def _where_cases(ws: Path, out: Path) -> list[tuple[list[str], str]]:
    """(argv, predicate) for every command that takes --where, with hostile predicates."""
    w = ["-w", str(ws)]
    over_candidates = ["error('boom') IS NULL", "CAST(edit_type AS INTEGER) = 1",
                       "sum(candidate_id) > 0", "'127.0.0.1'::INET IS NULL", DEEP_NOT]
    commands = {
        "select": (["select", "--from", "candidates"], over_candidates + [
            "row_number() OVER () > 0", "1=1; DROP TABLE runs", "candidate_id > ?",
            "candidate_id IN (SELECT key FROM stage_state)", "read_csv('/etc/passwd') IS NULL",
            "json_execute_serialized_sql(json_serialize_sql('SELECT 1')) IS NULL",
            "random() < 2", "no_such_column = 1"]),
        "score": (["score"], over_candidates[:3]),
        "filter": (["filter"], over_candidates[:3]),
        # (balance's own options are checked first: a valid --cap, so the predicate is met)
        "balance": (["balance", "--cap", "2"], over_candidates[:2]),
        "dedup": (["dedup"], over_candidates[:2]),
        "report": (["report", str(out / "r.html")], over_candidates[:2]),
        "review": (["review", "--no-launch"], over_candidates[:3]),
        "export": (["export", str(out / "export"), "-f", "jsonl"], over_candidates[:3]),
        "generate": (["generate", "--size", "64"], ["error('boom') IS NULL",
                                                    "CAST(edit_type AS INTEGER) = 1"]),
        "ground": (["ground"], ["error('boom') IS NULL", "CAST(instruction AS INTEGER) = 1"]),
        "classify-masks": (["classify-masks"], ["max(edit_id) > 0",
                                                "edit_id = $missing"]),
        "instruct": (["instruct"], ["error('boom') IS NULL", "CAST(sha256 AS BIGINT) = 1"]),
        "caption": (["caption", "--backend", "openai", "--model", "m", "--base-url",
                     "http://127.0.0.1:9/v1"], ["error('boom') IS NULL",
                                                "CAST(sha256 AS BIGINT) = 1"]),
        "judge": (["judge", "--backend", "openai", "--model", "m", "--base-url",
                   "http://127.0.0.1:9/v1"], over_candidates[:3]),
        "chain": (["chain", "--size", "64"], over_candidates[:3]),
    }
    return [(argv + w + ["--where", pred], pred) for argv, preds in commands.values()
            for pred in preds]


def test_every_command_refuses_hostile_where_in_one_line_and_changes_nothing(hws, tmp_path):
    cases = _where_cases(hws.root, tmp_path)
    assert {c[0][0] for c in cases} >= {"select", "score", "filter", "balance", "dedup",
                                         "report", "review", "export", "generate", "ground",
                                         "classify-masks", "instruct", "caption", "judge",
                                         "chain"}
    before, files = contents(hws), tree(hws.root)
    results = run_many([argv for argv, _ in cases])
    for (argv, pred), res in zip(cases, results):
        one_line_error(res, "--where", code=1)
    assert contents(hws) == before
    assert tree(hws.root) == files
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "export").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_parameters_are_text_bound_by_exact_name(hws):
    w = ["-w", str(hws.root)]
    res = run_many([
        ["select", "--from", "anchors", "--count", "--where", "external_id = :t", "-p", "t",
         "nan"] + w,
        ["select", "--from", "anchors", "--count", "--where", "width > $ab", "-p", "a", "1",
         "-p", "ab", "600"] + w,
        ["select", "--from", "anchors", "--count", "--where", "width > 600"] + w,
        ["select", "--from", "anchors", "--count", "--where", "sha256 = :o", "-p", "o",
         "10"] + w,
        ["select", "--from", "anchors", "--where", "width > ?"] + w,
        ["select", "--from", "anchors", "--where", "width > $w", "-p", "w", "wide"] + w,
        ["select", "--from", "anchors", "--where", "width > $_uc_seed", "-p", "_uc_seed",
         "1"] + w,
    ])
    assert [r["rc"] for r in res[:4]] == [0, 0, 0, 0], res
    assert res[0]["stdout"].strip() == "0" and res[3]["stdout"].strip() == "0"
    assert res[1]["stdout"] == res[2]["stdout"] and int(res[2]["stdout"]) > 0
    one_line_error(res[4], "positional parameter")
    one_line_error(res[5], "--where fails in DuckDB", "wide")
    one_line_error(res[6], "-p _uc_seed")


def test_a_predicate_past_the_memory_bound_ends_in_one_line(hws):
    """range(50000000) allocates outside DuckDB's memory limit: the bound interrupts it, and
    the CLI process ends when DuckDB does not stop soon enough. A real subprocess."""
    e = dict(os.environ, ULTRACURATE_SQL_MEMORY="300MB", ULTRACURATE_PROGRESS="0")
    res = subprocess.run([ULTRACURATE, "select", "--from", "anchors", "-w", str(hws.root),
                          "--where", "len(range(50000000)) > 0"],
                         capture_output=True, text=True, env=e, timeout=300)
    one_line_error({"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr},
                   "--where needed more than 286 MiB of memory (ULTRACURATE_SQL_MEMORY)")


# -- `ultracurate sql`: read-only, no files, no network, configuration locked ---------------
def test_sql_cannot_write_files_reach_out_or_change_settings(hws, tmp_path):
    w = ["-w", str(hws.root)]
    config = hws.root / "ultracurate.toml"
    config_before = config.read_bytes()
    media = next(hws.root.joinpath("media").rglob("*.png"))
    media_before = file_sha(media)
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1,2\n3,4\n")
    outside = tmp_path / "out"
    hostile = [
        (f"COPY (SELECT 'x' AS models) TO '{config}' (FORMAT csv)", "not COPY"),
        (f"COPY anchors TO '{media}'", "not COPY"),
        (f"COPY anchors TO '{outside}.csv'", "not COPY"),
        (f"EXPORT DATABASE '{outside}'", "not EXPORT"),
        (f"ATTACH '{outside}.db' AS x (READ_WRITE)", "not ATTACH"),
        ("INSTALL inet", "not INSTALL|not LOAD"),
        ("LOAD inet", "not LOAD"),
        ("SET memory_limit = '100GB'", "not SET"),
        ("RESET memory_limit", "not SET|not RESET|not VARIABLE_SET"),
        ("CALL enable_logging()", "not CALL"),
        ("SELECT 1; SELECT 2", "one statement"),
        ("EXPLAIN ANALYZE COPY anchors TO 'x.csv'", "EXPLAIN only of a SELECT"),
        ("SELECT '127.0.0.1'::INET", "inet"),
        (f"SELECT * FROM read_csv('{table}')", "disabled"),
        ("SELECT * FROM glob('/etc/*')", "disabled"),
        ("SELECT count(*) FROM read_text('/etc/hostname')", "disabled"),
        ("SELECT current_setting('enable_external_access') AND false", None),
        ("SELECT ?", "name the parameters"),
        ("DROP TABLE anchors", "not DROP"),
        ("UPDATE anchors SET width = 1", "not UPDATE"),
    ]
    cases = [["sql", q] + w for q, _ in hostile]
    # --allow-files reads files, and still writes none
    cases += [["sql", "--allow-files", "-f", "csv", f"SELECT sum(a) AS s FROM read_csv('{table}')"] + w,
              ["sql", "--allow-files", f"COPY anchors TO '{outside}.csv'"] + w,
              ["sql", "--allow-files", f"SELECT * FROM read_csv('{table}') WHERE a > $m", "-p",
               "m", "1", "-f", "json"] + w]
    before, files = contents(hws), tree(hws.root)
    res = run_many(cases)
    for (q, message), r in zip(hostile, res):
        if message is None:  # allowed: a read of a setting
            assert r["rc"] == 0, r
            continue
        line = one_line_error(r, code=1)
        assert any(m.lower() in line.lower() for m in message.split("|")), (q, line)
    assert res[-3]["rc"] == 0 and res[-3]["stdout"].splitlines() == ["s", "4"], res[-3]
    one_line_error(res[-2], "not COPY")
    assert res[-1]["rc"] == 0 and '"a": 3' in res[-1]["stdout"], res[-1]
    assert config.read_bytes() == config_before and file_sha(media) == media_before
    assert not list(tmp_path.glob("out*")) and not (hws.root / "x.csv").exists()
    assert contents(hws) == before and tree(hws.root) == files


@pytest.mark.parametrize("read_only", [True, False])
def test_every_catalog_connection_is_sandboxed_by_duckdb_itself(hws, tmp_path, read_only):
    """Below the statement check: DuckDB's own settings refuse files, extensions and settings
    on every catalog connection, the writers' included."""
    target = tmp_path / "x.csv"
    with hws.catalog(read_only=read_only) as cat:
        for sql, error in [
                (f"COPY anchors TO '{target}'", duckdb.PermissionException),
                (f"EXPORT DATABASE '{tmp_path / 'exp'}'", duckdb.PermissionException),
                (f"ATTACH '{tmp_path / 'a.db'}' AS a", duckdb.PermissionException),
                ("INSTALL inet", duckdb.PermissionException),
                ("LOAD inet", duckdb.PermissionException),
                ("SELECT '127.0.0.1'::INET", duckdb.CatalogException),
                (f"SELECT * FROM read_csv('{target}')", duckdb.PermissionException),
                ("SET enable_external_access = true", duckdb.InvalidInputException),
                ("SET autoinstall_known_extensions = true", duckdb.InvalidInputException),
                ("RESET memory_limit", duckdb.InvalidInputException)]:
            with pytest.raises(error):
                cat.con.execute(sql)
        limit = cat.scalar("SELECT current_setting('memory_limit')")
    assert limit and not list(tmp_path.iterdir())


# -- catalog values used as paths -------------------------------------------------------------
@pytest.mark.parametrize("name, ok", [
    ("a" * 64 + ".png", True), ("0123456789abcdef" * 4 + ".jpg", True),
    ("../../x.jpg", False), ("/etc/passwd", False), ("a" * 64 + ".png/../../x", False),
    ("A" * 64 + ".png", False), ("a" * 63 + ".png", False), ("a" * 64, False),
    ("a" * 64 + ".p g", False), ("", False), (None, False), (5, False),
])
def test_media_names_are_the_stores_hash_form(tmp_path, name, ok):
    from ultracurate.workspace import MediaStore
    store = MediaStore(tmp_path / "media")
    if ok:
        assert store.path(name).parent.parent == store.root
    else:
        with pytest.raises(UltracurateError, match="not a media name"):
            store.path(name)


def test_a_tampered_catalog_cannot_make_a_command_read_or_write_outside(hws, tmp_path):
    """export, review, report and gc over a catalog whose media names were changed to paths:
    one line each, nothing read or written outside the store or the output folder, no media
    file removed."""
    ws_root = tmp_path / "copy"
    shutil.copytree(hws.root, ws_root)
    secret = tmp_path / "secret.png"
    shutil.copy(next(hws.root.joinpath("media").rglob("*.png")), secret)
    secret_sha = file_sha(secret)
    ws = Workspace(ws_root)
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET edited_image = ? WHERE candidate_id = 2",
                        [os.path.relpath(secret, ws.media.root / "ab")])
        cat.con.execute("UPDATE anchors SET media = ? WHERE anchor_id = 1", [str(secret)])
    w = ["-w", str(ws_root)]
    out = tmp_path / "out"
    out.mkdir()
    before, files = contents(ws), tree(ws_root)
    with ws.catalog(read_only=True) as cat:
        last_run = cat.scalar("SELECT coalesce(max(run_id), 0) FROM runs")
    res = run_many([
        ["export", str(out / "e"), "-f", "jsonl", "--where", "candidate_id <= 4"] + w,
        ["report", str(out / "r.html")] + w,
        ["review", "--no-launch"] + w,
        ["gc"] + w,
    ])
    for r in res:
        one_line_error(r, "is not a media name", code=1)
    assert list(out.iterdir()) == []
    assert file_sha(secret) == secret_sha and sorted(p.name for p in tmp_path.iterdir()) == \
        ["copy", "out", "secret.png"]
    after = contents(ws)
    assert {t: v for t, v in after.items() if t != "runs"} == \
        {t: v for t, v in before.items() if t != "runs"}
    with ws.catalog(read_only=True) as cat:  # refused before they ran: no run recorded
        new_runs = cat.query("SELECT stage, state, message FROM runs WHERE run_id > ?",
                             [last_run])
    assert new_runs == []
    assert tree(ws_root) == files


# -- a damaged catalog --------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "header":  # a flipped byte in DuckDB's database header: its checksum fails
        path.write_bytes(data[:4200] + bytes([data[4200] ^ 0xFF]) + data[4201:])
    elif how == "schema":  # a table changed outside ultracurate: the schema checksum fails
        con = duckdb.connect(str(path))
        con.execute("ALTER TABLE candidates ADD COLUMN sneaky VARCHAR")
        con.close()


@pytest.mark.parametrize("how", ["truncated", "empty", "header", "schema"])
def test_a_damaged_catalog_is_refused_by_every_command_without_a_write(hws, tmp_path, how):
    ws_root = tmp_path / "copy"
    shutil.copytree(hws.root, ws_root)
    catalog = ws_root / "catalog.duckdb"
    _damage(catalog, how)
    damaged = file_sha(catalog)
    files = tree(ws_root, skip=())
    empty = tmp_path / "empty"
    empty.mkdir()
    w = ["-w", str(ws_root)]
    res = run_many([
        ["stats"] + w, ["sql", "SELECT count(*) FROM anchors"] + w,
        ["select", "--count"] + w, ["show", "1"] + w, ["gc", "--dry-run"] + w, ["gc"] + w,
        ["filter", "--dry-run"] + w, ["filter"] + w, ["balance", "--cap", "2"] + w,
        ["classify-masks"] + w, ["instruct"] + w, ["score"] + w,
        ["export", str(tmp_path / "e"), "-f", "jsonl"] + w, ["report", str(tmp_path / "r.html")] + w,
        ["review", "--no-launch"] + w, ["ingest", str(empty)] + w,
    ])
    for r in res:
        one_line_error(r, "is damaged: restore from a copy", code=1)
    assert file_sha(catalog) == damaged and tree(ws_root, skip=()) == files
    assert not (tmp_path / "e").exists() and not (tmp_path / "r.html").exists()


# -- what a killed job leaves: a partial tail, a WAL, a torn WAL --------------------------------
_BLOCKS = 3 * 4096       # DuckDB's headers, before its blocks


def _kill_state(catalog: Path, wal: str, cut: str) -> None:
    """Leave catalog as a SIGKILL (or a cut copy) would. wal: '' none; 'whole' a committed
    write not yet checkpointed (the probe row); 'torn' the same with its last bytes unwritten.
    cut: '' none; 'tail' a new block torn part-way past the end (what a kill during a
    checkpoint or a large insert leaves); 'half' the file cut in half; 'last' cut inside the
    last block the catalog uses."""
    if wal:
        con = duckdb.connect(str(catalog))
        con.execute("PRAGMA disable_checkpoint_on_shutdown")
        con.execute("INSERT INTO schema_meta VALUES ('probe', 'in the WAL')")
        con.close()
        if wal == "torn":
            log = catalog.with_name(catalog.name + ".wal")
            log.write_bytes(log.read_bytes()[:-10])
    if cut == "last":
        from ultracurate.catalog import Catalog
        with Catalog(catalog, read_only=True) as cat:
            last = cat._last_used_block()
            block = cat.con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
    data = catalog.read_bytes()
    if cut == "tail":
        catalog.write_bytes(data + os.urandom(5 * 4096 + 100))
    elif cut == "half":
        catalog.write_bytes(data[:len(data) // 2])
    elif cut == "last":
        catalog.write_bytes(data[:_BLOCKS + (last + 1) * block - 4096])


@pytest.mark.parametrize("wal, cut, opens", [
    ("", "tail", True), ("whole", "tail", True), ("torn", "tail", True),
    ("whole", "", True), ("torn", "", True),
    ("", "half", False), ("whole", "half", False), ("", "last", False), ("whole", "last", False),
])
def test_what_a_killed_job_leaves_opens_and_a_truncated_catalog_does_not(hws, tmp_path, wal,
                                                                          cut, opens):
    """A job killed while DuckDB writes a new block leaves a partial last block (a WAL with it
    when a checkpoint was cut short, a torn WAL when a commit was): DuckDB opens that file
    and replays its WAL, so ultracurate opens it too, read-only and for writing, with every
    committed row (the probe row is there exactly when its WAL entry is whole), and the
    partial tail goes on being accepted after the WAL is checkpointed. A file cut before the
    end of a block it uses is refused with the one-line damaged error, WAL or not."""
    root = tmp_path / "ws"
    shutil.copytree(hws.root, root)
    catalog = root / "catalog.duckdb"
    before = contents(Workspace(root))
    _kill_state(catalog, wal, cut)
    damaged = file_sha(catalog)
    cli = run_many([["stats", "-w", str(root)]])[0]
    if not opens:
        for read_only in (True, False):
            with pytest.raises(UltracurateError, match="is damaged: restore from a copy.*"
                               "truncated"):
                Workspace(root).catalog(read_only=read_only)
        one_line_error(cli, "is damaged: restore from a copy", "truncated", code=1)
        assert file_sha(catalog) == damaged
        return
    assert cli["rc"] == 0, cli
    probe = [{"key": "probe", "value": "in the WAL"}] if wal == "whole" else []
    rest = lambda c: {t: v for t, v in c.items() if t != "schema_meta"}  # noqa: E731
    for read_only in (True, False, True):   # the writer's open and close checkpoint the WAL
        with Workspace(root).catalog(read_only=read_only) as cat:
            assert cat.query("SELECT key, value FROM schema_meta WHERE key = 'probe'") == probe
        assert rest(contents(Workspace(root))) == rest(before)


# -- options are checked at the CLI boundary --------------------------------------------------
def _commands():
    import typer

    from ultracurate.cli import app

    def walk(cmd, path=()):
        if getattr(cmd, "commands", None):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + (name,))
        else:
            yield " ".join(path), cmd
    return list(walk(typer.main.get_command(app)))


def test_every_numeric_option_of_every_command_is_bounded():
    """Every whole-number option has a range and every decimal option refuses nan and inf and
    checks its range (commands/_common.py: Count, Number): closes the class of `--batch-size
    -1` looping forever and `nan` pasted into SQL."""
    seen = 0
    for path, cmd in _commands():
        for p in cmd.params:
            desc = getattr(p, "type_descriptor", None)
            ann = getattr(desc, "annotation", None)
            if ann is int:
                assert p.min is not None and p.max is not None, f"{path} {p.opts}: no range"
                assert p.max <= 2**63 - 1, f"{path} {p.opts}"
                seen += 1
            elif ann is float:
                assert desc.parameter_info.parser is not None, f"{path} {p.opts}: nan passes"
                seen += 1
    assert seen >= 40


def test_the_clis_choices_are_the_librarys(tmp_path):
    """The option types in commands/_common.py name the same choices as the library."""
    from typing import get_args

    from ultracurate.commands import _common as c
    from ultracurate.evaluate import BENCHMARKS
    from ultracurate.generation.behaviour import BEHAVIOURS
    from ultracurate.instruct.backends import BACKENDS
    from ultracurate.instruct.importers import FORMATS as INSTRUCTION_FORMATS
    from ultracurate.names import EDIT_MODES, EXPORT_FORMATS, EXPORT_LAYOUTS
    assert get_args(c.Behaviour) == tuple(BEHAVIOURS)
    from ultracurate.captioners import BACKENDS as CAPTION_BACKENDS
    assert get_args(c.LLMBackend) == BACKENDS and get_args(c.Benchmark) == BENCHMARKS
    assert get_args(c.CaptionBackend) == CAPTION_BACKENDS
    from ultracurate.judge import BACKENDS as JUDGE_BACKENDS
    assert get_args(c.JudgeBackend) == JUDGE_BACKENDS
    assert get_args(c.InstructionsFormat) == INSTRUCTION_FORMATS
    assert get_args(c.EditMode) == EDIT_MODES
    assert get_args(c.ExportFormat) == EXPORT_FORMATS
    assert get_args(c.ExportLayout) == EXPORT_LAYOUTS
    for profile in get_args(c.Profile):
        Workspace.init(tmp_path / profile, {"models": {"profile": profile}})


BAD_OPTIONS = [
    (["ingest", "x", "--batch-size", "-1"], "--batch-size"),
    (["ingest", "x", "--batch-size", "0"], "--batch-size"),
    (["ingest", "x", "--max-pixels", "0"], "--max-pixels"),
    (["score", "--batch-size", "-1"], "--batch-size"),
    (["generate", "--batch-size", "9223372036854775808"], "--batch-size"),
    (["select", "--sample", "-1"], "--sample"),
    (["select", "--limit", "-1"], "--limit"),
    (["select", "--limit", "9223372036854775808"], "--limit"),
    (["select", "--seed", "9223372036854775808"], "--seed"),
    (["select", "--seed", "-3"], "--seed"),
    (["select", "-f", "xml"], "--format"),
    (["select", "--from", "runs"], "--from"),
    (["sql", "-f", "xml", "SELECT 1"], "--format"),
    (["init", "--profile", "bogus", "{tmp}/never"], "--profile"),
    (["filter", "--clip-image-min", "nan"], "--clip-image-min"),
    (["filter", "--dino-max", "inf"], "--dino-max"),
    (["filter", "--clip-dir-min", "-nan"], "--clip-dir-min"),
    (["filter", "--top-k", "0"], "--top-k"),
    (["filter", "--mode", "both"], "--mode"),
    (["filter", "--preset", "strict"], "--preset"),
    (["generate", "-n", "0"], "--candidates"),
    (["generate", "--mode", "x"], "--mode"),
    (["generate", "--behaviour", "x"], "--behaviour"),
    (["generate", "--size", "0"], "--size"),
    (["generate", "--device", "gpu"], "--device"),
    (["generate", "--engine", "spark"], "--engine"),
    (["generate", "--until-accepted", "0"], "--until-accepted"),
    (["ground", "--box-threshold", "1.5"], "--box-threshold"),
    (["ground", "--text-threshold", "nan"], "--text-threshold"),
    (["classify-masks", "--min-area", "-0.1"], "--min-area"),
    (["classify-masks", "--max-contours", "-1"], "--max-contours"),
    (["instruct", "--per-anchor", "0"], "--per-anchor"),
    (["instruct", "--concurrency", "0"], "--concurrency"),
    (["instruct", "--timeout", "0"], "--timeout"),
    (["instruct", "--temperature", "nan"], "--temperature"),
    (["instruct", "--backend", "x"], "--backend"),
    (["instruct", "--dtype", "float8"], "--dtype"),
    (["caption", "--max-attempts", "0"], "--max-attempts"),
    (["caption", "--temperature", "nan"], "--temperature"),
    (["caption", "--backend", "x"], "--backend"),
    (["caption", "--image-size", "-1"], "--image-size"),
    (["judge", "--max-attempts", "0"], "--max-attempts"),
    (["judge", "--temperature", "nan"], "--temperature"),
    (["judge", "--backend", "x"], "--backend"),
    (["judge", "--concurrency", "0"], "--concurrency"),
    (["filter", "--judge-min", "colour=4"], "--judge-min"),
    (["filter", "--judge-min", "quality=inf"], "--judge-min"),
    (["chain", "--turns", "0"], "--turns"),
    (["chain", "--candidates", "0"], "--candidates"),
    (["chain", "--box-threshold", "1.5"], "--box-threshold"),
    (["chain", "--backend", "x"], "--backend"),
    (["review", "--port", "0"], "--port"),
    (["review", "--port", "70000"], "--port"),
    (["review", "--margin", "-1"], "--margin"),
    (["balance", "--target", "0"], "--target"),
    (["dedup", "--threshold", "nan"], "--threshold"),
    (["dedup", "--what", "all"], "--what"),
    (["report", "r.html", "--examples", "-1"], "--examples"),
    (["export", "o", "-f", "csv"], "--format"),
    (["export", "o", "--shard-size", "0"], "--shard-size"),
    (["import-instructions", "f.json", "-f", "x"], "--format"),
    (["eval", "-b", "x", "--predictions", "p", "--references", "r"], "--benchmark"),
]


def test_bad_options_are_refused_in_one_line_before_anything_runs(hws, tmp_path):
    before, files = contents(hws), tree(hws.root)
    cases = [[a.replace("{tmp}", str(tmp_path)) for a in argv] + ["-w", str(hws.root)]
             if argv[0] not in ("init", "eval") else
             [a.replace("{tmp}", str(tmp_path)) for a in argv] for argv, _ in BAD_OPTIONS]
    res = run_many(cases, cwd=tmp_path)
    for (argv, option), r in zip(BAD_OPTIONS, res):
        line = one_line_error(r, option, code=2)
        assert line.startswith(f"error: ultracurate {argv[0]}: "), line
    assert contents(hws) == before and tree(hws.root) == files
    assert list(tmp_path.iterdir()) == []


def test_the_library_refuses_a_batch_size_that_would_never_advance(hws):
    from ultracurate.stages.ingest import IngestStage
    for size in (0, -1):
        with pytest.raises(UltracurateError, match="batch size"):
            run(hws, IngestStage(items=[]), batch_size=size, progress=False)
    with pytest.raises(SelectionError, match="--limit"):
        Selection(limit=-1)
    from ultracurate.thresholds import Thresholds
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UltracurateError, match="finite"):
            Thresholds.preset().override(clip_sim_image_min=bad)


# -- COCO entries that cannot be used are rejects, not tracebacks ---------------------------
def test_coco_annotations_without_caption_or_image_id_are_recorded_rejects(tmp_path,
                                                                         demo_photos):
    import json
    photos = sorted(p for p in demo_photos.parent.iterdir() if p.suffix in (".png", ".jpg"))[:2]
    folder = tmp_path / "coco"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    doc = {"images": [{"id": 1, "file_name": photos[0].name},
                      {"id": 2, "file_name": photos[1].name},
                      {"id": 3}],                                        # no file_name
           "annotations": [{"image_id": 1, "caption": "a good caption"},
                           {"image_id": 2, "caption": "another good one"},
                           {"image_id": 1},                              # no caption
                           {"caption": "no image id"},
                           {"image_id": 2, "caption": 123},              # not text
                           {"image_id": 2, "caption": ["a", "list"]},
                           {"image_id": 2, "caption": None},
                           {"image_id": 99, "caption": "unknown image"},
                           "not an object"]}
    coco = folder / "captions.json"
    coco.write_text(json.dumps(doc))
    ws = Workspace.init(tmp_path / "ws")
    w = ["-w", str(ws.root), "--json"]
    first, again = run_many([["ingest", str(coco)] + w, ["ingest", str(coco)] + w])
    assert first["rc"] == 0 and again["rc"] == 0, (first, again)
    assert "Traceback" not in first["stderr"] + again["stderr"]
    assert json.loads(first["stdout"])["rows_done"] == 2
    assert json.loads(again["stdout"])["rows_in"] == 0  # rejects are not retried
    with ws.catalog(read_only=True) as cat:
        anchors = cat.query("SELECT external_id, captions FROM anchors_v ORDER BY external_id")
        rejects = dict(cat.con.execute(
            "SELECT source_path, reason FROM ingest_rejects").fetchall())
    assert anchors == [{"external_id": "1", "captions": ["a good caption"]},
                       {"external_id": "2", "captions": ["another good one"]}]
    expected = {"images[2]": "has no file_name", "annotations[2]": "has no caption",
                "annotations[3]": "has no image_id",
                "annotations[4]": "caption that is not text (int)",
                "annotations[5]": "caption that is not text (list)",
                "annotations[6]": "has no caption",
                "annotations[7]": "names image_id 99",
                "annotations[8]": "is not an object"}
    assert len(rejects) == len(expected)
    for entry, why in expected.items():
        reason = rejects[f"{coco}#{entry}"]
        assert why in reason and reason.startswith(f"{coco}: {entry} "), reason


# -- report on a full disk or a read-only folder ------------------------------------------------
def _can_mount() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c",
                               "mount -t tmpfs -o size=16k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount(), reason="no private mount namespace here: see the "
                                              "injected-error test below")
@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_report_on_a_full_disk_or_read_only_folder_is_one_line_and_leaves_nothing(
        hws, tmp_path, disk):
    """The real CLI in a private mount namespace, writing to a tmpfs that is full, or to a
    read-only bind mount (as root, chmod would not stop a write)."""
    out = tmp_path / "out"
    out.mkdir()
    prepare = {"full": f"mount -t tmpfs -o size=64k tmpfs {out} && "
                       f"(cat /dev/zero > {out}/filler 2>/dev/null; true)",
               "read-only": f"mount --bind {out} {out} && mount -o remount,bind,ro {out}"}[disk]
    script = (f"{prepare} && ls -A {out} > {tmp_path}/before && "
              f"{ULTRACURATE} report {out}/r.html -w {hws.root}; rc=$?; "
              f"ls -A {out} > {tmp_path}/after; exit $rc")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, ULTRACURATE_PROGRESS="0"))
    one_line_error({"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr},
                   "cannot write the report", code=1)
    assert "No space left" in res.stderr or "Read-only" in res.stderr
    assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()


def test_report_write_error_is_one_line_and_leaves_no_temporary_file(hws, tmp_path,
                                                                     monkeypatch):
    """The same at the write call, injected: works where mounts are not allowed."""
    import errno

    import ultracurate.report as report
    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    monkeypatch.setattr(report.os, "replace", full_disk)
    out = tmp_path / "r.html"
    with pytest.raises(UltracurateError, match="cannot write the report .*No space left"):
        report.write_report(hws, out)
    monkeypatch.setattr(report.os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []


# -- secrets never reach the catalog or the terminal ------------------------------------------
@pytest.mark.parametrize("text, secret", [
    ("HTTP 401: Incorrect API key provided: Bearer sk-proj-AbC123xyz789", "sk-proj-AbC123xyz789"),
    ("Authorization: Bearer eyJhbGciOi.JIUzI1NiJ9.abc", "eyJhbGciOi.JIUzI1NiJ9.abc"),
    ("key sk-live_0123456789 rejected", "sk-live_0123456789"),
    ('{"api_key": "qwertyuiop"}', "qwertyuiop"),
    ("https://h/v1?api_key=zxcvbnm123&x=1", "zxcvbnm123"),
    ("token: hf_abcdefghijklmnopqrstu", "hf_abcdefghijklmnopqrstu"),
])
def test_redact_removes_keys_and_bearer_tokens(text, secret):
    out = redact(text)
    assert secret not in out and "[REDACTED]" in out
    assert redact("a task-based edit of a sky-high tower") == "a task-based edit of a sky-high tower"


class _EchoServer:
    """A chat-completions server that echoes the caller's Authorization header: in a 401 error
    ('Incorrect API key provided: Bearer ...'), or (answer=True) in a 200 answer's text."""

    def __init__(self, answer: bool):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                auth = self.headers.get("Authorization", "")
                if answer:
                    code, body = 200, {"choices": [{"message": {
                        "content": f"I was called with {auth} and cannot help"}}]}
                else:
                    code, body = 401, {"error": {
                        "message": f"Incorrect API key provided: {auth}"}}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_an_api_key_echoed_by_a_server_is_redacted_everywhere(hws, tmp_path):
    ws_root = tmp_path / "copy"
    shutil.copytree(hws.root, ws_root)
    rejecting, echoing = _EchoServer(answer=False), _EchoServer(answer=True)
    pattern_key, opaque_key = "sk-proj-Zx81Yw72Vu63", "opaque-secret-XYZ987"
    w = ["-w", str(ws_root), "--backend", "openai", "--model", "m", "--max-attempts", "1",
         "--max-retries", "0"]
    try:
        res = run_many([
            ["instruct", "--base-url", rejecting.url, "--api-key", pattern_key,
             "--where", "anchor_id <= 2"] + w,
            ["instruct", "--base-url", echoing.url, "--where", "anchor_id BETWEEN 3 AND 4"] + w,
        ], env={"ULTRACURATE_LLM_API_KEY": opaque_key})
    finally:
        rejecting.httpd.shutdown()
        echoing.httpd.shutdown()
    for r in res:
        assert r["rc"] == 0 and "Traceback" not in r["stderr"], r
        assert pattern_key not in r["stdout"] + r["stderr"]
        assert opaque_key not in r["stdout"] + r["stderr"]
    with Workspace(ws_root).catalog(read_only=True) as cat:
        errors = [e for (e,) in cat.con.execute(
            "SELECT error FROM stage_state WHERE stage = 'instruct' AND state = 'failed'"
        ).fetchall()]
        invalid = cat.query("SELECT instruction, edit_reasons FROM edits "
                            "WHERE edit_status = 'invalid'")
        everything = " ".join(str(cat.con.execute(f"SELECT * FROM {t}").fetchall())
                              for t in ("runs", "stage_state", "edits", "anchors"))
    assert len(errors) == 2 and all("Incorrect API key provided: Bearer [REDACTED]" in e
                                    for e in errors), errors
    assert invalid and all("[REDACTED]" in r["instruction"] for r in invalid), invalid
    assert pattern_key not in everything and opaque_key not in everything


# -- FiftyOne's database started by two processes at once --------------------------------------
def _can_isolate_processes() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_isolate_processes(),
                    reason="FiftyOne joins any database service running on the machine: "
                           "the race needs a PID namespace of its own")
def test_review_pulls_started_together_while_the_database_starts(hws, tmp_path):
    """Three `review --pull` start FiftyOne's database in a fresh folder at the same moment:
    without the start lock one of them failed after a minute with ServiceListenTimeout. Each
    must end in its own one-line answer (here: no review dataset yet), none with a traceback.
    They run in a PID namespace of their own: FiftyOne attaches to any database service it can
    see, whatever its folder, and everything they start ends with the namespace."""
    from ultracurate.review import dataset_name
    env = dict(os.environ, FIFTYONE_DATABASE_DIR=str(tmp_path / "fodb"),
               FIFTYONE_DO_NOT_TRACK="true", ULTRACURATE_PROGRESS="0")
    env.pop("FIFTYONE_DATABASE_URI", None)
    env.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
    script = " ".join(
        f"({ULTRACURATE} review --pull -w {hws.root} > {tmp_path}/out{i} 2> {tmp_path}/err{i};"
        f" echo $? > {tmp_path}/rc{i}) &" for i in range(3)) + " wait"
    subprocess.run(["unshare", "-p", "-f", "--mount-proc", "sh", "-c", script], env=env,
                   timeout=600, check=True)
    for i in range(3):
        err = (tmp_path / f"err{i}").read_text()
        out = (tmp_path / f"out{i}").read_text()
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert (tmp_path / f"rc{i}").read_text().strip() == "1", err
        assert "Traceback" not in out + err, err
        assert len(lines) == 1 and f"no review dataset '{dataset_name(hws)}' yet" in lines[0]
