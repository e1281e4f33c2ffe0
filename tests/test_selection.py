"""The --where guard: only single read-only predicates over the view's columns pass; values are
bound; a rejected selection leaves the catalog as it was."""

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
