"""The --where guard: only single read-only predicates over the view's columns pass; values are
bound; a rejected selection leaves the catalog as it was."""

import duckdb
import pytest

from ultracurate.errors import SelectionError
from ultracurate.selection import Selection, selected_keys_sql


def _ids(ws, sel: Selection, view="anchors_v", key="anchor_id"):
    with ws.catalog() as cat:
        sql, params = selected_keys_sql(cat.con, view, key, sel, columns=key)
        return sorted(r[0] for r in cat.con.execute(sql, params).fetchall())


def _counts(ws):
    with ws.catalog(read_only=True) as cat:
        return {t: cat.scalar(f"SELECT count(*) FROM {t}")
                for t in ("anchors", "edits", "candidates", "runs")}


def test_plain_predicates_and_bound_parameters(ingested_ws):
    all_ids = _ids(ingested_ws, Selection())
    assert len(all_ids) == 9
    wide = _ids(ingested_ws, Selection(where="width > $w", params={"w": 600}))
    with ingested_ws.catalog(read_only=True) as cat:
        expected = sorted(r[0] for r in cat.con.execute(
            "SELECT anchor_id FROM anchors WHERE width > 600").fetchall())
    assert wide == expected and 0 < len(wide) < 9
    # sqlite-utils style :name works too, and a ':' inside a string literal is left alone
    assert _ids(ingested_ws, Selection(where="width > :w AND dataset <> 'a:b'",
                                       params={"w": 600})) == expected
    # a bound value is data, never SQL
    assert _ids(ingested_ws, Selection(where="external_id = $x",
                                       params={"x": "coffee' OR '1'='1"})) == []
    assert len(_ids(ingested_ws, Selection(where="external_id = $x",
                                           params={"x": "coffee"}))) == 1


@pytest.mark.parametrize("bad, message", [
    ("1=1; DROP TABLE anchors", r"not a valid SQL predicate|single SQL expression"),
    ("1=1); DROP TABLE anchors; --", r"not a valid SQL predicate|single SQL expression"),
    ("anchor_id IN (SELECT anchor_id FROM anchors)", "subquery"),
    ("EXISTS (SELECT 1)", "subquery"),
    ("no_such_column = 1", "unknown column 'no_such_column'"),
    ("nextval('x') > 0", r"may not call nextval"),
    ("width >", "not a valid SQL predicate"),
    ("width > $missing", r"parameter \$missing"),
    ("1=1 GROUP BY width", r"not a valid SQL predicate|single SQL expression"),
])
def test_rejected_predicates_leave_the_catalog_as_it_was(ingested_ws, bad, message):
    before = _counts(ingested_ws)
    with pytest.raises(SelectionError, match=message):
        _ids(ingested_ws, Selection(where=bad))
    assert _counts(ingested_ws) == before


def test_sample_is_deterministic_and_limit_takes_lowest_ids(ingested_ws):
    a = _ids(ingested_ws, Selection(sample=4, seed=7))
    b = _ids(ingested_ws, Selection(sample=4, seed=7))
    c = _ids(ingested_ws, Selection(sample=4, seed=8))
    assert a == b and len(a) == 4
    assert a != c or _ids(ingested_ws, Selection(sample=4, seed=9)) != a
    assert _ids(ingested_ws, Selection(limit=3)) == [1, 2, 3]
    # sampling applies to the user's selection
    sub = _ids(ingested_ws, Selection(where="format = 'JPEG'", sample=2, seed=1))
    with ingested_ws.catalog(read_only=True) as cat:
        jpeg = {r[0] for r in cat.con.execute(
            "SELECT anchor_id FROM anchors WHERE format = 'JPEG'").fetchall()}
    assert set(sub) <= jpeg and len(sub) == 2


@pytest.mark.parametrize("sel, order", [
    (Selection(limit=3), "anchor_id"),
    (Selection(where="width > $w", params={"w": 600}, limit=2), "anchor_id"),
    (Selection(limit=0), "anchor_id"),
    (Selection(limit=50), "anchor_id"),                      # more than the selection holds
    (Selection(where="anchor_id >= $a", params={"a": 8}, limit=1), "anchor_id"),  # far keys
    (Selection(where="anchor_id IN (2, 9)", limit=2), "anchor_id"),
    (Selection(sample=4, seed=7), "hash(anchor_id, 7), anchor_id"),
    (Selection(where="format = 'JPEG'", sample=2, seed=1), "hash(anchor_id, 1), anchor_id"),
])
def test_limit_and_sample_pick_the_rows_of_the_sorted_query(ingested_ws, sel, order):
    """--limit/--sample take the keys first, then their rows (no sort of the whole view;
    --limit: up to the N-th key, found a key window at a time): the rows, and every column
    of them, are those of ordering the view and taking N."""
    with ingested_ws.catalog(read_only=True) as cat:
        sql, params = selected_keys_sql(cat.con, "anchors_v", "anchor_id", sel)
        got = cat.query(sql + " ORDER BY anchor_id", params)
        where = sel.where.replace("$w", "600").replace("$a", "8") if sel.where else "true"
        n = sel.limit if sel.limit is not None else sel.sample
        want = cat.query(f"SELECT * FROM (SELECT * FROM anchors_v WHERE {where} "
                         f"ORDER BY {order} LIMIT {n}) ORDER BY anchor_id")
        total = cat.scalar(f"SELECT count(*) FROM anchors_v WHERE {where}")
    assert got == want and len(got) == min(n, total)


# -- the guard's pass, narrowed to the tables a predicate's terms read ----------------------

@pytest.fixture(scope="module")
def joined_ws(tmp_path_factory):
    """Candidates over edits over anchors, written straight into the catalog: edit 1 (3
    candidates, clip 0.5) on anchor 1 (dataset '1'); edit 2 (1 candidate, clip 0.1, the
    only gen_behaviour 'x') on anchor 2 (dataset 'x', the only one not a number); edit 3
    ('cat', the only edit_object not a number) on anchor 1 with one candidate (clip 0.6)."""
    from ultracurate.workspace import Workspace
    ws = Workspace.init(tmp_path_factory.mktemp("guard") / "ws")
    with ws.catalog() as cat:
        cat.con.execute("""
            INSERT INTO anchors (anchor_id, sha256, media, source_path, dataset, width, height)
            VALUES (1, 'a1', 'a1.jpg', 'p1', '1', 800, 600),
                   (2, 'a2', 'a2.jpg', 'p2', 'x', 500, 400);
            INSERT INTO edits (edit_id, anchor_id, source_caption, instruction, target_caption,
                               edit_object, edit_type, mode, edit_status,
                               mask_bbox_x, mask_bbox_y, mask_bbox_w, mask_bbox_h)
            VALUES (1, 1, 's', 'i', 't', '1', 'replace', 'region', 'grounded', 1, 2, 30, 40),
                   (2, 2, 's', 'i', 't', NULL, 'add', 'free', 'ready', NULL, NULL, NULL, NULL),
                   (3, 1, 's', 'i', 't', 'cat', 'replace', 'free', 'ready',
                    NULL, NULL, NULL, NULL);
            INSERT INTO candidates (candidate_id, edit_id, candidate_index, seed, auto_status,
                                    clip_sim_dir, gen_behaviour, human_decision)
            VALUES (1, 1, 0, 0, 'scored', 0.5, '1', NULL),
                   (2, 1, 1, 0, 'accepted', 0.5, NULL, NULL),
                   (3, 1, 2, 0, 'scored', 0.5, NULL, 'accept'),
                   (4, 2, 0, 0, 'scored', 0.1, 'x', NULL),
                   (5, 3, 0, 0, 'rejected', 0.6, NULL, NULL);""")
    return ws


GUARD_CASES = [
    # (predicate, params, None: passes | the error it fails with)
    ("clip_sim_dir > 0.3", {}, None),                                   # candidates
    ("status = 'accepted'", {}, None),                                  # computed over candidates
    ("edit_type = 'replace' AND mode = 'region'", {}, None),             # edits
    ("mask_bbox[3] > 5", {}, None),                                     # computed over edits
    ("anchor_width > 600 AND dataset = '1'", {}, None),                  # anchors (renamed)
    ("edit_type = 'replace' AND clip_sim_dir > $d AND mode = 'region'", {"d": "0.25"}, None),
    ("status = 'accepted' AND anchor_duplicate_of IS NULL", {}, None),
    # one term over two tables: only the view's pairs of rows (anchor 2 only meets 0.1)
    ("CASE WHEN clip_sim_dir > 0.3 THEN dataset::INTEGER ELSE 0 END >= 0", {}, None),
    ("coalesce(turn, 0) >= 0", {}, None),                                # LEFT JOIN's right side
    ("candidates_v.clip_sim_dir > 0.3 AND main.candidates_v.anchor_width > 0", {}, None),
    ("reject_reasons IS NULL OR len(reject_reasons) > 0", {}, None),
    # a value DuckDB cannot cast, on one row of one table the view joins
    ("gen_behaviour::INTEGER > 0", {}, "Conversion"),                   # candidates
    ("edit_object::INTEGER > 0", {}, "Conversion"),                     # edits
    ("dataset::INTEGER > 0", {}, "Conversion"),                         # anchors
    ("edit_type = 'replace' AND anchor_width > $w", {"w": "wide"}, "Conversion"),
    ("clip_sim_dir > 0 AND status::INTEGER > 0", {}, "Conversion"),     # computed column
    # reachable only through the join: anchor 2's dataset meets clip 0.1 on candidate 4
    ("CASE WHEN clip_sim_dir < 0.3 THEN dataset::INTEGER ELSE 0 END >= 0", {}, "Conversion"),
    ("clip_sim_dir > 0 AND CASE WHEN edit_object = 'cat' THEN anchor_path::INTEGER END > 0",
     {}, "Conversion"),
    # the NULLs a LEFT JOIN adds are values too
    ("coalesce(turn, -1)::UTINYINT >= 0", {}, "Conversion"),
    ("coalesce(reject_reasons[1], 'none')::INTEGER > 0", {}, "Conversion"),
]


@pytest.mark.parametrize("where, params, error", GUARD_CASES,
                         ids=[f"{i:02d}" for i in range(len(GUARD_CASES))])
def test_the_guard_evaluates_every_row_of_the_view_over_the_tables_it_reads(
        joined_ws, where, params, error):
    """The guard's pass over the tables a predicate's terms read fails exactly where the
    predicate fails over the whole view (one line, before the job reads a row), and a
    predicate it passes selects the view's own rows."""
    with joined_ws.catalog(read_only=True) as cat:
        try:
            want = sorted(r[0] for r in cat.con.execute(
                f"SELECT candidate_id FROM candidates_v WHERE ({where})", params).fetchall())
        except duckdb.Error as e:
            want = e
        assert isinstance(want, duckdb.Error) == (error is not None)  # the case is what it says
        if error:
            with pytest.raises(SelectionError, match=f"fails in DuckDB: {error}") as info:
                Selection(where, params).checked(cat.con, "candidates_v")
            assert "\n" not in str(info.value)
            return
        sql, p = selected_keys_sql(cat.con, "candidates_v", "candidate_id",
                                   Selection(where, params), columns="candidate_id")
        got = sorted(r[0] for r in cat.con.execute(sql, p).fetchall())
    assert got == want


@pytest.mark.parametrize("where", [w for w, _, e in GUARD_CASES if e and "$" not in w][:5])
def test_a_predicate_failing_on_one_row_stops_the_job_before_it_writes(joined_ws, where):
    from test_hardening import contents
    from ultracurate.runner import run
    before = contents(joined_ws)
    with pytest.raises(SelectionError, match="fails in DuckDB"):
        run(joined_ws, "filter", Selection(where), clip_min=0.25, progress=False)
    assert contents(joined_ws) == before


def test_the_guard_runs_once_per_catalog_file_and_view(joined_ws, monkeypatch):
    """A job opens several connections to its catalog (its plan, its pending rows): its
    --where is checked, and its pass over the rows run, once per view, not once per
    connection; a rejected predicate is rejected on every call."""
    from ultracurate import selection
    passes = []
    real = selection._run_once
    monkeypatch.setattr(selection, "_run_once",
                        lambda con, view, *a: passes.append(view) or real(con, view, *a))
    ok, bad = Selection("clip_sim_dir > 0.3"), Selection("dataset::INTEGER > 0")
    with joined_ws.catalog(read_only=True) as one, joined_ws.catalog(read_only=True) as two:
        for cat in (one, two, one):
            assert ok.checked(cat.con, "candidates_v") is not None
            with pytest.raises(SelectionError, match="Conversion"):
                bad.checked(cat.con, "candidates_v")
    assert passes.count("candidates_v") == 1 + 3
    with joined_ws.catalog(read_only=True) as cat:   # another view: a check of its own
        Selection("edit_type = 'add'").checked(cat.con, "edits_v")
    assert passes.count("edits_v") == 1


def test_view_lineage_follows_the_view_definitions(joined_ws):
    """Each column of candidates_v maps to the table whose row computes it (views of views
    followed, renamed columns and expressions kept); a LEFT JOIN's right side to None."""
    from ultracurate.selection import view_lineage
    with joined_ws.catalog(read_only=True) as cat:
        lineage = view_lineage(cat.con, "candidates_v")
        columns = [r[0] for r in cat.con.execute("DESCRIBE candidates_v").fetchall()]
    assert list(lineage) == columns
    table = {c: (v[0] if v else None) for c, v in lineage.items()}
    assert {c: table[c] for c in ("clip_sim_dir", "status", "edit_id", "edit_type",
                                  "mask_bbox", "anchor_width", "dataset", "reject_reasons",
                                  "session_id")} == {
        "clip_sim_dir": "candidates", "status": "candidates", "edit_id": "candidates",
        "edit_type": "edits", "mask_bbox": "edits", "anchor_width": "anchors",
        "dataset": "anchors", "reject_reasons": None, "session_id": None}


UNNAMED_COLUMNS = [
    # (view, predicate): each passed the guard and meant other columns in the job's query
    # than in the guard's pass over one table (there, #2 was height; in anchors_v, sha256)
    ("anchors_v", "anchor_id > 0 AND height > 0 AND CAST(#2 AS INTEGER) > 0"),
    ("candidates_v", "#2 > 0"),
    ("candidates_v", "clip_sim_dir > 0 AND COLUMNS(*) IS NOT NULL"),
    ("candidates_v", "COLUMNS('clip_.*') > 0"),
    ("candidates_v", "COLUMNS(lambda c: c LIKE 'clip%') > 0"),
    ("edits_v", "edit_type = 'add' OR *COLUMNS('mask_bbox_.') > 0"),
]


@pytest.mark.parametrize("view, where", UNNAMED_COLUMNS)
def test_a_predicate_must_name_its_columns(joined_ws, view, where):
    """A star (COLUMNS(...)) or a positional reference (#n) stands for whichever columns the
    query around it has: refused, one line, before a job reads or writes anything."""
    from test_hardening import contents
    from ultracurate.runner import run
    with joined_ws.catalog(read_only=True) as cat:
        with pytest.raises(SelectionError, match="must name the columns") as info:
            Selection(where).checked(cat.con, view)
    assert "\n" not in str(info.value)
    if view == "candidates_v":
        before = contents(joined_ws)
        with pytest.raises(SelectionError, match="must name the columns"):
            run(joined_ws, "filter", Selection(where), clip_min=0.25, progress=False)
        assert contents(joined_ws) == before
