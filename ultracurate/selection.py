"""`--where` selections: a user's SQL predicate, checked by DuckDB's own parser to be one
read-only expression over a view's columns, with its values bound as parameters.

A predicate is parsed inside `SELECT * FROM <view> WHERE (<predicate>)` with
`json_serialize_sql`; the statement must come back as exactly that one SELECT, and the
predicate's expression tree may hold no subquery, no table, no column the view lacks and no
function with side effects. Parameters are written `$name` (DuckDB's form) or `:name`
(sqlite-utils' form), and their values are only ever bound, never pasted into SQL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import duckdb

from .errors import SelectionError

# Scalar functions that change state or reach outside the catalog.
_DENIED_FUNCTIONS = {"nextval", "currval", "setseed", "getenv", "current_setting"}
_DENIED_PREFIXES = ("read_", "write_", "glob", "query", "sniff_", "parquet_", "http")


def coerce_param(value: str) -> Any:
    """`-p n 5` binds the integer 5, `-p x 0.2` the float, anything else the string."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


@dataclass
class Selection:
    """Which rows a job or query runs over."""

    where: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    sample: int | None = None
    seed: int = 0

    def to_json(self) -> dict:
        return {"where": self.where, "params": self.params, "limit": self.limit,
                "sample": self.sample, "seed": self.seed}

    def checked_where(self, con: duckdb.DuckDBPyConnection, view: str) -> str | None:
        """The predicate, with :name rewritten to $name, after validation against view."""
        if self.where is None or not self.where.strip():
            return None
        return validate_predicate(con, view, self.where, self.params)


def _colon_to_dollar(predicate: str) -> str:
    """Rewrite sqlite-style :name parameters as $name, using DuckDB's tokenizer so that a
    colon inside a string literal or a '::' cast is left alone."""
    tokens = duckdb.tokenize(predicate)
    out = []
    last = 0
    for i, (pos, kind) in enumerate(tokens):
        end = tokens[i + 1][0] if i + 1 < len(tokens) else len(predicate)
        text = predicate[pos:end].rstrip()
        if (kind == duckdb.token_type.operator and text == ":" and i + 1 < len(tokens)
                and tokens[i + 1][1] == duckdb.token_type.identifier
                and tokens[i + 1][0] == pos + 1
                and not (i > 0 and predicate[pos - 1] == ":")):
            out.append(predicate[last:pos])
            out.append("$")
            last = pos + 1
    out.append(predicate[last:])
    return "".join(out)


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def validate_predicate(con: duckdb.DuckDBPyConnection, view: str, predicate: str,
                       params: dict[str, Any]) -> str:
    predicate = _colon_to_dollar(predicate)
    sql = f"SELECT * FROM {view} WHERE ({predicate}\n)"
    parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    if parsed.get("error"):
        msg = parsed.get("error_message", "cannot parse")
        raise SelectionError(f"--where is not a valid SQL predicate: {msg}")
    statements = parsed["statements"]
    node = statements[0]["node"] if len(statements) == 1 else None
    if (node is None or node.get("type") != "SELECT_NODE"
            or node["from_table"].get("table_name") != view
            or node.get("group_expressions") or node.get("having") or node.get("qualify")
            or node.get("modifiers") or node.get("cte_map", {}).get("map")
            or node.get("where_clause") is None):
        raise SelectionError("--where must be a single SQL expression that selects rows "
                             "(no ';', no second statement)")
    allowed = {c.lower() for c in _view_columns(con, view)}
    used_params = set()
    for n in _walk(node["where_clause"]):
        cls = n.get("class")
        if cls == "SUBQUERY" or n.get("type") in ("SUBQUERY", "BASE_TABLE", "TABLE_FUNCTION"):
            raise SelectionError("--where may not contain a subquery or a table reference")
        if cls == "COLUMN_REF":
            name = n["column_names"][-1]
            if name.lower() not in allowed:
                raise SelectionError(
                    f"--where names an unknown column '{name}' (see `ultracurate sql "
                    f"\"DESCRIBE {view}\"` for the columns)")
        if cls == "FUNCTION":
            fname = n.get("function_name", "").lower()
            if fname in _DENIED_FUNCTIONS or fname.startswith(_DENIED_PREFIXES):
                raise SelectionError(f"--where may not call {fname}()")
        if cls == "PARAMETER":
            used_params.add(n.get("identifier"))
    missing = sorted(p for p in used_params if p not in params)
    if missing:
        raise SelectionError(f"--where uses parameter ${missing[0]} with no value "
                             f"(give it with -p {missing[0]} VALUE)")
    return predicate


def _view_columns(con: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()]


def selected_keys_sql(con: duckdb.DuckDBPyConnection, view: str, key: str,
                      selection: Selection, extra_where: str | None = None,
                      columns: str = "*", join: str | None = None) -> tuple[str, dict]:
    """SQL (and its bound parameters) for the rows of view that selection picks.

    --sample and --limit apply to the user's selection alone, before extra_where and join (a
    stage's own predicate and join, trusted) narrow it, so that rerunning the same sample
    resumes the same rows.
    """
    user = selection.checked_where(con, view)
    params = {k: v for k, v in selection.params.items() if user and f"${k}" in user}
    inner = f"SELECT * FROM {view}" + (f" WHERE ({user}\n)" if user else "")
    if selection.sample is not None:
        inner += f" ORDER BY hash({key}, $_uc_seed), {key} LIMIT $_uc_sample"
        params["_uc_seed"] = int(selection.seed)
        params["_uc_sample"] = int(selection.sample)
    elif selection.limit is not None:
        inner += f" ORDER BY {key} LIMIT $_uc_limit"
        params["_uc_limit"] = int(selection.limit)
    sql = f"SELECT {columns} FROM ({inner}) sel"
    if join:  # trusted, from a stage: e.g. an ANTI JOIN against finished rows
        sql += f" {join}"
    if extra_where:
        sql += f" WHERE ({extra_where})"
    return sql, params


def referenced_columns(con: duckdb.DuckDBPyConnection, view: str,
                       selection: Selection) -> set[str]:
    """Lower-case names of the view's columns that the selection's predicate reads (after
    the same validation as every --where)."""
    where = selection.checked_where(con, view)
    if not where:
        return set()
    sql = f"SELECT * FROM {view} WHERE ({where}\n)"
    node = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    return {n["column_names"][-1].lower() for n in _walk(node["statements"][0]["node"]
                                                           ["where_clause"])
            if n.get("class") == "COLUMN_REF"}
