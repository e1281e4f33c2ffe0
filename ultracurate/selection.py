"""`--where` selections: a user's SQL predicate, checked by DuckDB's own parser, binder and
function catalog to be one read-only expression over a view's columns, with its values bound
as parameters.

The guard, in order:
1. parses `SELECT * FROM <view> WHERE (<predicate>)` with `json_serialize_sql`; the statement
   must come back as exactly that one SELECT (no second statement, GROUP BY, ...). DuckDB's
   parser refuses expressions nested deeper than `limits.MAX_EXPRESSION_DEPTH`;
2. walks the expression tree: no subquery, table, window function, column the view lacks or
   column not named (*, COLUMNS(...), #n);
   every function is looked up in `duckdb_functions()` and refused unless DuckDB classifies it
   as a scalar function (not an aggregate, window, table or pragma function) that is neither
   VOLATILE nor has side effects (random, nextval, setseed, error, ...);
3. takes the parameter names from the tree: `$name` (DuckDB's form) or `:name` (sqlite-utils'),
   matched exactly; `?` and `$1` are refused. A value from the command line is text that DuckDB
   casts to the type its place needs (the column's type), as it casts a quoted literal;
4. binds, plans and runs the predicate once over every row of the view, under
   `limits.bounded` (a time and a memory bound), so that any error DuckDB would raise later
   (a failed cast, an extension it would need, error()) is raised here, before anything is
   written, as one line. A top-level AND term over one table's columns runs over that table
   alone, not the view's joins (`_passes`, `view_lineage`). Every catalog connection already
   has no file or network access and no extension autoload (`limits.duckdb_config`).
"""

from __future__ import annotations

import copy
import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import duckdb

from .errors import SelectionError, UltracurateError
from .limits import MAX_EXPRESSION_DEPTH, bounded

# Parse-tree node types that name a relation: a predicate selects rows, it reads no table.
_RELATION_NODES = ("SUBQUERY", "BASE_TABLE", "TABLE_FUNCTION", "JOIN", "EXPRESSION_LIST")
# Parse-tree classes that stand for columns without naming them: a star (COLUMNS(*),
# COLUMNS('re'), *COLUMNS(...)) or a positional reference (#2) means whichever columns the
# query around the predicate has, which differ between the guard's pass over one table
# (_passes) and a job's query, and between catalog versions.
_UNNAMED_COLUMNS = ("STAR", "POSITIONAL_REFERENCE")
# duckdb_functions().function_type values a predicate may call.
_CALLABLE = ("scalar", "macro")


@dataclass
class Selection:
    """Which rows a job or query runs over. `params` values are bound as they are: a Python
    number binds a number; the CLI's `-p NAME VALUE` binds text, which DuckDB casts to the
    type the parameter's place needs.

    `where`, `params`, `limit`, `sample` and `seed` are the user's (the guard checks them).
    ultracurate narrows a selection with its own SQL, trusted code never passed through the
    guard: `scope`, predicates over the same view (they may read other tables) with their
    `scope_params`; and `parent`, a child selection: the rows whose parent row (of
    `parent_table`, joined on its key) the parent selection picks, by a semi-join on the
    parent's view (generate: the candidates of the selected edits)."""

    where: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    scope: tuple[str, ...] = ()
    scope_params: dict[str, Any] = field(default_factory=dict)
    parent: "Selection | None" = None
    parent_table: str | None = None
    _checked: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for name, value in (("limit", self.limit), ("sample", self.sample)):
            if value is not None and (not isinstance(value, numbers.Integral)
                                      or isinstance(value, bool) or value < 0):
                raise SelectionError(f"--{name} must be a whole number >= 0, got {value!r}")

    def to_json(self) -> dict:
        """What runs.selection records: the user's selection (a child's, its parent's)."""
        if self.parent is not None and self.where is None and self.limit is None \
                and self.sample is None:
            return {**self.parent.to_json(), **({"scope": list(self.scope)} if self.scope
                                                else {})}
        out = {"where": self.where, "params": self.params, "limit": self.limit,
               "sample": self.sample, "seed": self.seed}
        if self.scope:
            out["scope"] = list(self.scope)
        return out

    @property
    def everything(self) -> bool:
        """Whether it picks every row of its view (and so of the view's table: each view
        holds every row of its table once)."""
        return (not (self.where and self.where.strip()) and self.limit is None
                and self.sample is None and not self.scope and self.parent is None)

    def within(self, table: str, *scope: str, **scope_params) -> "Selection":
        """A child selection over another view: its rows whose parent row (of `table`, this
        selection's view) this selection picks, narrowed by trusted predicates."""
        return Selection(parent=self, parent_table=table, scope=tuple(scope),
                         scope_params=scope_params)

    def narrowed(self, *scope: str, **scope_params) -> "Selection":
        """This selection with more trusted predicates over the same view."""
        import dataclasses
        return dataclasses.replace(self, scope=self.scope + tuple(scope),
                                   scope_params={**self.scope_params, **scope_params},
                                   _checked=self._checked)

    def checked(self, con: duckdb.DuckDBPyConnection, view: str) -> "Checked | None":
        """The validated predicate and its bound parameters (None without a --where). The
        check runs once per catalog file and view (a job's connections share it), once per
        connection for an in-memory database."""
        if self.where is None or not self.where.strip():
            return None
        key = (_database(con), view, self.where, repr(sorted(self.params.items())))
        if key not in self._checked:
            self._checked[key] = check_predicate(con, view, self.where, self.params)
        return self._checked[key]

    def checked_where(self, con: duckdb.DuckDBPyConnection, view: str) -> str | None:
        """The predicate, with :name rewritten to $name, after validation against view."""
        c = self.checked(con, view)
        return c.predicate if c else None


@dataclass(frozen=True)
class Checked:
    predicate: str           # with :name rewritten to $name
    params: dict[str, Any]   # exactly the parameters the predicate names


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
    """Every dict in a parse tree, without recursion (a deep tree cannot overflow the stack)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            yield n
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)


def _parse(con: duckdb.DuckDBPyConnection, sql: str) -> dict:
    try:
        text = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
        parsed = json.loads(text)
    except RecursionError:
        parsed = {"error": True, "error_message": "Max expression depth limit exceeded"}
    except duckdb.Error as e:
        raise SelectionError(f"--where cannot be parsed: {_first_line(e)}") from None
    if parsed.get("error"):
        msg = parsed.get("error_message", "cannot parse")
        if "max expression depth" in msg.lower():
            raise SelectionError(f"--where is nested too deeply (more than "
                                 f"{MAX_EXPRESSION_DEPTH} levels)")
        raise SelectionError(f"--where is not a valid SQL predicate: {_first_line(msg)}")
    return parsed


def _first_line(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _function_kinds(con: duckdb.DuckDBPyConnection, names: set[str]) -> dict[str, list]:
    """name -> [(function_type, stability, has_side_effects), ...] from DuckDB's catalog."""
    if not names:
        return {}
    rows = con.execute(
        "SELECT lower(function_name), function_type, stability, has_side_effects "
        "FROM duckdb_functions() WHERE list_contains($names, lower(function_name))",
        {"names": sorted(names)}).fetchall()
    out: dict[str, list] = {}
    for name, kind, stability, side_effects in rows:
        out.setdefault(name, []).append((kind, stability, side_effects))
    return out


def _check_function(name: str, kinds: list) -> None:
    callable_ = [k for k in kinds if k[0] in _CALLABLE]
    if not kinds:
        return  # unknown to DuckDB: the binder refuses it with its own message
    if not callable_:
        what = {"aggregate": "an aggregate", "window": "a window function",
                "table": "a table function", "pragma": "a pragma",
                "table_macro": "a table function"}.get(kinds[0][0], kinds[0][0])
        raise SelectionError(f"--where may not call {name}(): it is {what}, and a predicate "
                             "tests one row at a time")
    if any(k[1] == "VOLATILE" or k[2] for k in callable_):
        raise SelectionError(f"--where may not call {name}(): DuckDB marks it volatile or "
                             "with side effects, and a selection must give the same rows "
                             "every time it is read")


_TRUSTED_OK: set[str] = set()


def check_trusted(con: duckdb.DuckDBPyConnection, predicate: str) -> None:
    """A predicate ultracurate wrote itself (a stage's, a scope's) is not run under the user's
    bounds, but it must give the same rows every time it is read (resumption counts on it):
    no volatile function. Checked once per predicate text."""
    if predicate in _TRUSTED_OK:
        return
    tree = _walk(_parse(con, f"SELECT 1 WHERE ({predicate}\n)"))
    functions = {str(n.get("function_name", "")).lower() for n in tree
                 if n.get("class") == "FUNCTION"}
    for name, kinds in _function_kinds(con, functions).items():
        if any(k[1] == "VOLATILE" or k[2] for k in kinds if k[0] in _CALLABLE):
            raise SelectionError(f"a stage's predicate may not call {name}(): DuckDB marks "
                                 "it volatile, and a selection must give the same rows every "
                                 "time it is read")
    _TRUSTED_OK.add(predicate)


def _database(con: duckdb.DuckDBPyConnection) -> str | int:
    """The file a connection reads (its id for an in-memory database)."""
    path = con.execute("SELECT path FROM duckdb_databases() "
                       "WHERE database_name = current_database()").fetchall()[0][0]
    return os.path.realpath(path) if path else id(con)


def check_predicate(con: duckdb.DuckDBPyConnection, view: str, predicate: str,
                    params: dict[str, Any], run: bool = True) -> Checked:
    """Validate predicate over view (see the module's docstring); SelectionError if not.
    run=False skips step 4 (a trusted predicate: DuckDB still binds it when it is used)."""
    predicate = _colon_to_dollar(predicate)
    sql = f"SELECT * FROM {view} WHERE ({predicate}\n)"
    parsed = _parse(con, sql)
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
    tree = list(_walk(node["where_clause"]))
    bound = _lambda_names(tree)
    used_params: list[str] = []
    functions: set[str] = set()
    for n in tree:
        cls, kind = n.get("class"), n.get("type")
        if cls == "SUBQUERY" or kind in _RELATION_NODES:
            raise SelectionError("--where may not contain a subquery or a table reference")
        if cls in _UNNAMED_COLUMNS:
            raise SelectionError("--where must name the columns it reads: no *, COLUMNS(...) "
                                 "or #n (the columns they stand for depend on the query "
                                 "that reads the predicate)")
        if cls == "WINDOW":
            raise SelectionError(f"--where may not call {n.get('function_name', 'a window')}"
                                 "(): it is a window function, and a predicate tests one row "
                                 "at a time")
        if cls == "COLUMN_REF":
            name = n["column_names"][-1]
            if name.lower() not in allowed and name.lower() not in bound:
                raise SelectionError(
                    f"--where names an unknown column '{name}' (see `ultracurate sql "
                    f"\"DESCRIBE {view}\"` for the columns)")
        if cls == "FUNCTION":
            functions.add(str(n.get("function_name", "")).lower())
        if cls == "PARAMETER":
            ident = str(n.get("identifier", ""))
            if ident.isdigit():
                raise SelectionError("--where uses a positional parameter ('?' or '$1'): "
                                     "name it, e.g. width > $w -p w 600")
            if ident not in used_params:
                used_params.append(ident)
    kinds = _function_kinds(con, functions)
    for name in sorted(functions):
        _check_function(name, kinds.get(name, []))
    missing = [p for p in used_params if p not in params]
    if missing:
        raise SelectionError(f"--where uses parameter ${missing[0]} with no value "
                             f"(give it with -p {missing[0]} VALUE)")
    bound_params = {p: params[p] for p in used_params}
    if run:
        _run_once(con, view, predicate, bound_params, node["where_clause"])
    return Checked(predicate, bound_params)


def _run_once(con: duckdb.DuckDBPyConnection, view: str, predicate: str,
              params: dict[str, Any], where_node: dict) -> None:
    """Bind, plan and evaluate the predicate over every row once, bounded (see `_passes`);
    any DuckDB error becomes one SelectionError line."""
    try:
        with bounded(con, "--where"):
            for sql, used in _passes(con, view, predicate, where_node):
                con.execute(sql, {p: params[p] for p in used} or None).fetchall()
    except duckdb.Error as e:
        msg = _first_line(e)
        if "Max expression depth" in msg:
            raise SelectionError(f"--where is nested too deeply (more than "
                                 f"{MAX_EXPRESSION_DEPTH} levels)") from None
        raise SelectionError(f"--where fails in DuckDB: {msg}") from None
    except SelectionError:
        raise
    except UltracurateError as e:  # the bound's own error (time or memory), one line
        raise SelectionError(str(e)) from None


def _passes(con: duckdb.DuckDBPyConnection, view: str, predicate: str, where_node: dict
            ) -> list[tuple[str, list[str]]]:
    """The statements (each with the parameters it names) that evaluate the predicate on
    every row of view: its top-level AND terms whose columns all come from one row of one
    table (`view_lineage`) over that table alone, each table's terms together; the other
    terms over the view.

    A term over one table's columns gives on a row of the view what it gives on that
    table's row, so running it over the whole table runs it on every row a job can select,
    without the joins, which were most of the pass (at 4.1M candidates, a term over anchors'
    columns: 0.97 CPU s over candidates_v, 0.02 s over anchors; bench/results/scale.md).
    These are the terms DuckDB pushes into that table's scan when the job runs, and here no
    term over another table filters that table's rows first, so the pass meets every value
    the job can. What a pass counts is not the view's row count, so none is kept."""
    lineage = view_lineage(con, view)
    groups: dict[str | None, list[dict]] = {}
    constant: list[dict] = []
    for term in _conjuncts(where_node):
        tables = {(lineage.get(c) or (None,))[0] for c in _term_columns(term, lineage)}
        if any(len(n["column_names"]) > 1 for n in _walk(term)
               if n.get("class") == "COLUMN_REF"):
            tables.add(None)   # a qualified name (candidates_v.x) binds as written: the view
        if not tables:
            constant.append(term)
        else:
            groups.setdefault(tables.pop() if len(tables) == 1 else None, []).append(term)
    if not groups or list(groups) == [None]:  # nothing narrows: the predicate as written
        return [(f"SELECT count(*) FROM {view} WHERE ({predicate}\n)",
                 sorted(_parameters(where_node)))]
    groups[next(iter(groups))].extend(constant)   # a term without columns: any one pass
    out = []
    for table, terms in groups.items():
        source = view if table is None else f"(SELECT 1 FROM {_quote(table)}) AS {view}"
        stmt = _parse(con, f"SELECT count(*) FROM {source} WHERE true AND true")
        node = stmt["statements"][0]["node"]
        if table is not None:  # the view's columns the terms read, as the view computes them
            node["from_table"]["subquery"]["node"]["select_list"] = [
                {**copy.deepcopy(lineage[c][1]), "alias": c}
                for c in sorted({c for t in terms for c in _term_columns(t, lineage)})]
        node["where_clause"]["children"] = terms
        sql = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(stmt)]).fetchall()[0][0]
        out.append((sql, sorted({p for t in terms for p in _parameters(t)})))
    return out


def _conjuncts(node: dict):
    """The terms of a predicate's top-level AND (the predicate itself when it is no AND)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.get("class") == "CONJUNCTION" and n.get("type") == "CONJUNCTION_AND":
            stack.extend(reversed(n["children"]))
        else:
            yield n


def _term_columns(term: dict, lineage: dict) -> set[str]:
    """The view's columns (lower-case) a term reads. A name a lambda binds is no column,
    unless the view has a column of that name (then it counts: the pass reads more)."""
    tree = list(_walk(term))
    bound = _lambda_names(tree)
    return {name for n in tree if n.get("class") == "COLUMN_REF"
            for name in [n["column_names"][-1].lower()]
            if name not in bound or name in lineage}


def _lambda_names(tree: list[dict]) -> set[str]:
    """Names a lambda binds (list_filter(captions, c -> c LIKE '%dog%')): no columns."""
    return {ref["column_names"][-1].lower() for n in tree if n.get("class") == "LAMBDA"
            for ref in _walk(n.get("lhs")) if ref.get("class") == "COLUMN_REF"}


def _parameters(node: dict) -> set[str]:
    return {str(n.get("identifier")) for n in _walk(node) if n.get("class") == "PARAMETER"}


def view_lineage(con: duckdb.DuckDBPyConnection, view: str
                 ) -> dict[str, tuple[str, dict] | None]:
    """Each column of a view or table (lower-case name, in order): (table, its expression
    over that table's columns, a parse tree) when the view computes it from one row of one
    table that it inner-joins or keeps every row of (a LEFT JOIN's left side); None when it
    comes from a LEFT JOIN's right side, a subquery or several tables. Read from the view's
    definition in the catalog (DuckDB's parse of it; views of views followed), so it cannot
    drift from sql/views.sql. {} when the definition is not a plain SELECT over joins, or
    its reading disagrees with the view's own columns."""
    found = con.execute(
        "SELECT sql FROM duckdb_views() WHERE view_name = $v AND NOT internal "
        "AND database_name = current_database() AND schema_name = current_schema()",
        {"v": view}).fetchall()
    if not found:
        names = [r[0] for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = $t "
            "AND database_name = current_database() AND schema_name = current_schema() "
            "ORDER BY column_index", {"t": view}).fetchall()]
        if not names:
            return {}
        refs = _parse(con, "SELECT " + ", ".join(_quote(n) for n in names))
        return {n.lower(): (view, ref) for n, ref in
                zip(names, refs["statements"][0]["node"]["select_list"])}
    prefix = f"CREATE VIEW {view} AS "
    if not found[0][0].startswith(prefix):
        return {}
    node = _parse(con, found[0][0][len(prefix):].rstrip().rstrip(";"))["statements"]
    node = node[0]["node"] if len(node) == 1 else {}
    if (node.get("type") != "SELECT_NODE" or node.get("where_clause") is not None
            or node.get("group_expressions") or node.get("having") or node.get("qualify")
            or node.get("modifiers") or node.get("cte_map", {}).get("map")
            or node.get("sample") or node.get("aggregate_handling") != "STANDARD_HANDLING"):
        return {}
    leaves: dict[str, dict | None] = {}   # alias -> its columns' lineage (None: unknown)
    if not _leaves(con, node["from_table"], False, leaves):
        return {}
    out: list[tuple[str, tuple[str, dict] | None]] = []
    for item in node["select_list"]:
        if item.get("class") == "STAR":
            cols = leaves.get(str(item.get("relation_name") or "").lower())
            if (cols is None or item.get("columns") or item.get("expr")
                    or item.get("replace_list") or item.get("rename_list")
                    or item.get("qualified_exclude_list")):
                return {}
            skip = {str(x).lower() for x in item.get("exclude_list") or []}
            out.extend((c, v) for c, v in cols.items() if c not in skip)
            continue
        name = item.get("alias") or (item["column_names"][-1]
                                     if item.get("class") == "COLUMN_REF" else "")
        out.append((name.lower(), _over_one_table(item, leaves)))
    if [c for c, _ in out] != [c.lower() for c in _view_columns(con, view)]:
        return {}
    return dict(out)


def _leaves(con: duckdb.DuckDBPyConnection, node: dict, nullable: bool,
            leaves: dict[str, dict | None]) -> bool:
    """Fill alias -> lineage of the relations a FROM clause joins; a relation on a LEFT
    JOIN's right side (or any side of another outer join) maps each column to None."""
    kind = node.get("type")
    if kind == "JOIN":
        how = node.get("join_type")
        return (_leaves(con, node["left"], nullable or how not in ("INNER", "LEFT"), leaves)
                and _leaves(con, node["right"], nullable or how != "INNER", leaves))
    alias = str(node.get("alias") or node.get("table_name") or "").lower()
    if kind == "BASE_TABLE" and not node.get("schema_name") and not node.get("catalog_name"):
        cols = view_lineage(con, node["table_name"])
        if not cols:
            return False
        leaves[alias] = {c: None for c in cols} if nullable else cols
        return True
    if kind == "SUBQUERY":
        leaves[alias] = None   # its columns are not followed: a column of it is None
        return True
    return False


def _over_one_table(item: dict, leaves: dict) -> tuple[str, dict] | None:
    """(table, item's expression over that table's columns) when every column item reads
    comes from one row of one table (see view_lineage); None otherwise."""
    tables = set()
    for n in _walk(item):
        if n.get("class") == "SUBQUERY" or n.get("type") in _RELATION_NODES \
                or n.get("class") == "LAMBDA":
            return None
        if n.get("class") == "COLUMN_REF":
            names = n["column_names"]
            cols = leaves.get(names[0].lower()) if len(names) == 2 else None
            source = (cols or {}).get(names[1].lower()) if cols else None
            if source is None:
                return None
            tables.add(source[0])
    if len(tables) != 1:
        return None

    def swap(n):   # a copy of the expression, each column replaced by its own expression
        if isinstance(n, list):
            return [swap(x) for x in n]
        if not isinstance(n, dict):
            return n
        if n.get("class") == "COLUMN_REF":
            names = n["column_names"]
            return copy.deepcopy(leaves[names[0].lower()][names[1].lower()][1])
        return {k: swap(v) for k, v in n.items()}
    return tables.pop(), {**swap(item), "alias": ""}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def validate_predicate(con: duckdb.DuckDBPyConnection, view: str, predicate: str,
                       params: dict[str, Any]) -> str:
    """The predicate with :name rewritten to $name, after check_predicate."""
    return check_predicate(con, view, predicate, params).predicate


def _view_columns(con: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()]


def selected_keys_sql(con: duckdb.DuckDBPyConnection, view: str, key: str,
                      selection: Selection, extra_where: str | None = None,
                      columns: str = "*", join: str | None = None,
                      _depth: int = 0) -> tuple[str, dict]:
    """SQL (and its bound parameters) for the rows of view that selection picks.

    --sample and --limit apply to the user's selection alone, before the selection's scope,
    extra_where and join (ultracurate's own predicates and joins, trusted) narrow it, so that
    rerunning the same sample resumes the same rows. A child selection's rows are those whose
    parent the parent selection picks (a semi-join on the parent's view).
    """
    from .catalog import KEYS, VIEWS
    checked = selection.checked(con, view)
    user = checked.predicate if checked else None
    params = dict(checked.params) if checked else {}
    tag = f"_uc{_depth or ''}_"  # a parent's internal parameters get their own names
    source = view
    if selection.parent is not None:
        pkey = KEYS[selection.parent_table]
        psql, pparams = selected_keys_sql(con, VIEWS[selection.parent_table], pkey,
                                          selection.parent, columns=pkey, _depth=_depth + 1)
        source = f"(SELECT * FROM {view} SEMI JOIN ({psql}) parent USING ({pkey}))"
        params.update(pparams)
    inner = f"SELECT * FROM {source}" + (f" WHERE ({user}\n)" if user else "")
    order = None
    if selection.sample is not None:
        order, n = f"hash({key}, ${tag}seed), {key}", int(selection.sample)
        params[f"{tag}seed"] = int(selection.seed)
    elif selection.limit is not None:
        order, n = key, int(selection.limit)
    bound = (_nth_key(con, source, key, user, params, view, n)
             if selection.sample is None and order is not None else None)
    if bound is not None:
        # --limit N: the rows up to the selection's N-th key (none: it has fewer rows)
        table, lo, last = bound
        if last is not None:
            params.update(key_window_params(con, table, key, lo, last + 1, f"{tag}w"))
            inner = (f"SELECT * FROM {source} WHERE {key_window(table, key, f'{tag}w')}"
                     + (f" AND ({user}\n)" if user else ""))
    elif order is not None:
        # The keys first (a top-N over the key alone), then their rows: ordering the whole
        # view's rows to take N of them sorted every column of millions of rows (2.2 GB).
        params[f"{tag}n"] = n
        picked = (f"SELECT {key} FROM {source}" + (f" WHERE ({user}\n)" if user else "")
                  + f" ORDER BY {order} LIMIT ${tag}n")
        inner = f"SELECT * FROM {source} SEMI JOIN ({picked}) _uc_picked USING ({key})"
    sql = f"SELECT {columns} FROM ({inner}) sel"
    if join:  # trusted, from a stage: e.g. an ANTI JOIN against finished rows
        sql += f" {join}"
    narrowing = [*selection.scope, *([extra_where] if extra_where else [])]
    for predicate in narrowing:
        check_trusted(con, predicate)
    if narrowing:
        sql += " WHERE " + " AND ".join(f"({w})" for w in narrowing)
        params.update(selection.scope_params)
    return sql, params


def top_n(selection: Selection | None) -> bool:
    """Whether the selection (or a parent of it) takes --limit or --sample rows: its rows are
    picked over the whole selection at once."""
    while selection is not None:
        if selection.limit is not None or selection.sample is not None:
            return True
        selection = selection.parent
    return False


def key_window(table: str, key: str, tag: str = "_uc_w") -> str:
    """A predicate over the table's view for the rows whose key lies in [${tag}lo, ${tag}hi),
    with the ranges that window implies on the keys of the tables the view joins (a candidate
    window's edits, their anchors), bound by `key_window_params`. The implied ranges change
    no result; they let each table's scan skip what lies outside them, whatever join order
    DuckDB picks (at 41M edits it built its hash table over all 16M anchors for a window of
    16k candidates: 2.8 s; with the ranges, 0.08 s)."""
    from .catalog import KEYS, PARENTS
    out = [f"{key} >= ${tag}lo AND {key} < ${tag}hi"]
    parent = PARENTS.get(table)
    while parent:
        fk = KEYS[parent]
        out.append(f"{fk} BETWEEN ${tag}{fk}_lo AND ${tag}{fk}_hi")
        parent = PARENTS.get(parent)
    return " AND ".join(out)


def key_window_params(con: duckdb.DuckDBPyConnection, table: str, key: str, lo: int, hi: int,
                      tag: str = "_uc_w") -> dict:
    """The parameters of `key_window` for keys in [lo, hi): each parent key's range over the
    rows of the window (an empty window: an empty range)."""
    from .catalog import KEYS, PARENTS
    params = {f"{tag}lo": lo, f"{tag}hi": hi}
    parent, rows, col, a, b = PARENTS.get(table), table, key, lo, hi - 1
    while parent:
        fk = KEYS[parent]
        if a is not None:
            a, b = con.execute(f"SELECT min({fk}), max({fk}) FROM {rows} "
                               f"WHERE {col} BETWEEN $a AND $b", {"a": a, "b": b}).fetchall()[0]
        params[f"{tag}{fk}_lo"], params[f"{tag}{fk}_hi"] = (a, b) if a is not None else (0, -1)
        parent, rows, col = PARENTS.get(parent), parent, fk
    return params


def key_bounds(con: duckdb.DuckDBPyConnection, table: str, column: str
               ) -> tuple[int, int, int] | None:
    """The lowest and highest value of a whole-number column of table and how many rows hold
    one (the span and density key windows are sized from); None when it has none or is not
    whole numbers."""
    lo, hi, n = con.execute(f"SELECT min({column}), max({column}), count({column}) "
                            f"FROM {table}").fetchall()[0]
    return (lo, hi, n) if isinstance(lo, int) and isinstance(hi, int) else None


def _nth_key(con: duckdb.DuckDBPyConnection, source: str, key: str, user: str | None,
             params: dict, view: str, n: int) -> tuple[str, int, int | None] | None:
    """(table, its lowest key, the N-th key in key order of the rows of source the user's
    predicate picks), the N-th found a key window at a time from the lowest key (each
    window's predicate reaches the table's scan, so --limit 100 reads a few thousand rows,
    not the whole view); the N-th is None when there are fewer than N rows. None when the
    view's key is not a whole-number key of a catalog table (outside items): then a top-N
    over the whole selection."""
    from .catalog import KEYS, VIEWS
    table = next((t for t, v in VIEWS.items() if v == view and KEYS.get(t) == key), None)
    if table is None:
        return None
    bounds = key_bounds(con, table, key)
    if bounds is None:   # an empty table selects nothing; any other key: a top-N
        empty = not con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        return (table, 0, None) if empty else None
    lo, hi, rows = bounds
    if n == 0:
        return table, lo, lo - 1
    where = f" AND ({user}\n)" if user else ""
    sql = (f"SELECT {key} FROM {source} WHERE {key_window(table, key)}{where} "
           f"ORDER BY {key} LIMIT $_uc_take")
    span = max(1, -(-(hi - lo + 1) * 2 * n // max(rows, 1)))   # twice the keys of n rows
    start, found = lo, 0
    with bounded(con, "--where"):
        while start <= hi:
            window = key_window_params(con, table, key, start, start + span)
            got = con.execute(sql, {**params, **window, "_uc_take": n - found}).fetchall()
            found += len(got)
            if found == n:
                return table, lo, got[-1][0]
            start, span = start + span, span * 4
    return table, lo, None


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
