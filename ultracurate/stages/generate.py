"""Generate candidate pairs for edits: plan the candidate rows, then render them in batches.

`plan_candidates` inserts the missing (edit_id, candidate_index) rows for the selected edits, up
to n_total per edit, each with a deterministic seed, status 'planned' (one idempotent insert:
planning again adds nothing, planning more adds only the new indices). `GenerateStage` then
renders planned rows in batches of pairs across edits (ultracurate.generation), writes both
images to the media store (JPEG quality 100, content-addressed, tmp + rename) from wherever it
runs, and returns the names; the driver records them. A run killed at any point and rerun
finishes the remaining rows: a candidate's row and images only count once its batch committed,
and its seed, hence its images, do not change.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import polars as pl

from ..catalog import Catalog, now
from ..errors import UltracurateError
from ..generation import params as P
from ..images import load_rgb, resize_center_crop, to_jpeg_bytes
from ..runner import BatchResult, Context, RunSummary, Stage, make_engine, run_stage
from ..selection import Selection, selected_keys_sql
from ..workspace import Workspace

MODES = ("auto", "free", "region")
PAIRS_PER_CALL = {"free": 7, "region": 6}   # the released generator's pairs per call


@dataclass
class PlanReport:
    planned: int = 0                               # new candidate rows
    edits: int = 0                                 # edits with candidates to generate
    skipped: dict[int, str] = field(default_factory=dict)  # edit_id -> reason

    def to_json(self) -> dict:
        reasons: dict[str, int] = {}
        for r in self.skipped.values():
            reasons[r] = reasons.get(r, 0) + 1
        return {"planned": self.planned, "edits": self.edits, "skipped": reasons}


def _words(text: str) -> int:
    return len(str(text).split(" "))


def generation_mode(edit: dict, mode: str) -> tuple[str | None, str | None]:
    """(mode to generate the edit in, or None with the reason it is skipped)."""
    if mode not in MODES:
        raise UltracurateError(f"unknown --mode '{mode}' (auto, free or region)")
    if max(_words(edit["source_caption"]), _words(edit["target_caption"])) > P.MAX_CAPTION_WORDS:
        return None, f"caption over {P.MAX_CAPTION_WORDS} words"
    m = edit["mode"] if mode == "auto" else mode
    if m == "region" and (edit["edit_status"] != "grounded" or edit["mask_rle"] is None):
        return None, "region edit without a mask (not grounded)"
    return m, None


def plan_candidates(cat: Catalog, edit_ids: list[int] | None, n_total: int, seed: int = 0, *,
                    behaviour: str = "method", mode: str = "auto",
                    selection: Selection | None = None) -> PlanReport:
    """Add the missing candidates 0..n_total-1 of each edit (edit_ids, or the edits the
    selection picks), status 'planned', in one transaction. Seeds: `method`, one per
    candidate from (seed, edit_id, index); `ultraedit-compat`, one per call as the released
    code batches them: the edits of one mode, taken PAIRS_PER_CALL at a time in edit_id
    order, share the seed of each candidate index (a 32-bit seed)."""
    if behaviour not in P.BEHAVIOURS:
        raise UltracurateError(f"unknown behaviour '{behaviour}' (method or ultraedit-compat)")
    if n_total < 1:
        raise UltracurateError("--candidates must be at least 1")
    cols = "edit_id, mode, edit_status, mask_rle, source_caption, target_caption"
    if edit_ids is not None:
        edits = cat.query(f"SELECT {cols} FROM edits_v WHERE list_contains(?, edit_id) "
                          "ORDER BY edit_id", [list(map(int, edit_ids))])
    else:
        sql, prm = selected_keys_sql(cat.con, "edits_v", "edit_id", selection or Selection(),
                                     None, cols)
        edits = cat.query(sql + " ORDER BY edit_id", prm)
    report = PlanReport()
    have = {}
    ids = [e["edit_id"] for e in edits]
    for eid, idx in cat.con.execute(
            "SELECT edit_id, candidate_index FROM candidates WHERE list_contains(?, edit_id)",
            [ids]).fetchall():
        have.setdefault(eid, set()).add(idx)
    rows = []
    ordinal = {"free": 0, "region": 0}
    for e in edits:
        m, why = generation_mode(e, mode)
        if m is None:
            report.skipped[e["edit_id"]] = why
            continue
        report.edits += 1
        group = ordinal[m] // PAIRS_PER_CALL[m]
        ordinal[m] += 1
        for k in range(n_total):
            if k in have.get(e["edit_id"], ()):
                continue
            if behaviour == "method":
                s = P.candidate_seed(seed, e["edit_id"], k)
                order = (k, 0, 0, e["edit_id"])
            else:
                s = P.candidate_seed(seed, "compat", m, group, k, bits=32)
                order = (k, 0 if m == "free" else 1, group, e["edit_id"])
            rows.append((order, {"edit_id": e["edit_id"], "candidate_index": k, "seed": s,
                                 "gen_behaviour": behaviour,
                                 "gen_params": json.dumps({"mode": m}),
                                 "auto_status": "planned"}))
    if not rows:
        return report
    rows.sort(key=lambda r: r[0])  # a compat call's rows are contiguous
    cat.con.execute("BEGIN")
    try:
        first = cat.next_id("candidates")
        at = now()
        df = pl.DataFrame([{"candidate_id": first + i, **r, "created_at": at}
                           for i, (_, r) in enumerate(rows)])
        cat.insert_rows("candidates", df)
        cat.con.execute("COMMIT")
    except BaseException:
        cat.con.execute("ROLLBACK")
        raise
    report.planned = len(rows)
    return report


# -- the stage ------------------------------------------------------------------------------------
class GenerateStage(Stage):
    name = "generate"
    table = "candidates"
    default_where = "auto_status = 'planned'"
    columns = ("candidate_id, edit_id, candidate_index, seed, gen_behaviour, gen_params, "
               "source_caption, target_caption, anchor_media, mask_rle, mask_height, "
               "mask_width")
    writes = {"candidates": {"source_image", "edited_image", "source_is_anchor", "gen_params",
                             "gen_run", "auto_status", "error"}}
    batch_size = 16
    roles = ("editor",)

    def __init__(self, size: int = 512, keep_anchor_source: bool = False,
                 soft_variant: str = "ultraedit", dtype: str | None = None,
                 write_threads: int = 4, **extra):
        super().__init__(size=size, keep_anchor_source=keep_anchor_source,
                         soft_variant=soft_variant, dtype=dtype, **extra)
        if size % 8 or size < 64:
            raise UltracurateError(f"--size must be a multiple of 8, at least 64 (got {size})")
        self.size, self.keep_anchor_source = int(size), bool(keep_anchor_source)
        self.soft_variant, self.dtype, self.write_threads = soft_variant, dtype, write_threads
        self.pipe = None

    def __getstate__(self):  # ship the settings to a worker, never the loaded model
        state = self.__dict__.copy()
        state["pipe"] = None
        return state

    def setup(self, ctx: Context) -> None:
        import torch

        from ..models import load
        dtype = getattr(torch, self.dtype) if self.dtype else None
        self.pipe = load(ctx.workspace, "editor", device=ctx.device, dtype=dtype)

    def prepare(self, rows: list[dict], ctx: Context) -> dict:
        """Decode each anchor once, resized (short side) and centre-cropped to size."""
        ws = ctx.workspace
        out = {}
        for r in rows:
            name = r["anchor_media"]
            if name not in out:
                try:
                    out[name] = resize_center_crop(load_rgb(ws.media.path(name)), self.size)
                except UltracurateError as e:
                    out[name] = e
        return out

    def _mask_fn(self, row: dict):
        from ..masks import soft_mask
        latent = (self.size // 8, self.size // 8)

        def fn(soft_value):
            return soft_mask(row["mask_rle"], row["mask_height"], row["mask_width"], latent,
                             variant=self.soft_variant, soft_value=soft_value,
                             crop=(self.size,))
        return fn

    def process(self, rows: list[dict], prepared: dict, ctx: Context) -> BatchResult:
        from ..generation import Pair, generate_compat, generate_method
        from ..masks import soft_mask_settings

        failed: dict[int, str] = {}
        jobs: list[tuple[list[dict], list, object]] = []   # (rows, pairs, call) per model call
        method_rows, method_pairs = [], []
        compat_groups: dict[tuple, tuple[list, list]] = {}
        for r in rows:
            anchor = prepared.get(r["anchor_media"])
            if isinstance(anchor, Exception):
                failed[r["candidate_id"]] = str(anchor)
                continue
            m = json.loads(r["gen_params"])["mode"]
            pair = Pair(r["source_caption"], r["target_caption"], anchor, {}, int(r["seed"]),
                        mask=self._mask_fn(r) if m == "region" else None)
            if r["gen_behaviour"] == "method":
                pair.params = P.sample_method(int(r["seed"]), m)
                method_rows.append(r)
                method_pairs.append(pair)
            else:
                g = compat_groups.setdefault((int(r["seed"]), m), ([], []))
                g[0].append(r)
                g[1].append(pair)
        if method_rows:
            jobs.append((method_rows, method_pairs,
                         lambda ps=method_pairs: generate_method(self.pipe, ps)))
        for (seed, m), (grows, gpairs) in compat_groups.items():
            jobs.append((grows, gpairs, lambda ps=gpairs, s=seed, mm=m:
                         generate_compat(self.pipe, ps, s, mm)[0]))

        ws = ctx.workspace
        updates = []
        with ThreadPoolExecutor(self.write_threads) as pool:
            for jrows, pairs, call in jobs:
                try:
                    images = call()
                except Exception as e:  # one failing call fails its rows, not the batch
                    msg = f"{type(e).__name__}: {e}".splitlines()[0]
                    failed.update({r["candidate_id"]: msg for r in jrows})
                    continue
                for r, pair, img in zip(jrows, pairs, images):
                    src_img = pair.anchor if self.keep_anchor_source else img.source
                    # JPEG encoding and writes run on threads while the next call runs.
                    fut_s = pool.submit(_put_jpeg, ws, src_img)
                    fut_e = pool.submit(_put_jpeg, ws, img.edited)
                    gp = dict(pair.params)
                    gp.update(behaviour=r["gen_behaviour"], size=self.size,
                              real_steps=P.real_steps(gp["total_steps"], gp["strength"]),
                              source_is_anchor=self.keep_anchor_source)
                    if gp["mode"] == "region":
                        gp["mask"] = soft_mask_settings(
                            self.soft_variant, gp.get("soft_value"), (self.size,),
                            rle=r["mask_rle"], height=r["mask_height"], width=r["mask_width"])
                    updates.append((r["candidate_id"], fut_s, fut_e, gp))
            rows_out = []
            for cid, fut_s, fut_e, gp in updates:
                try:
                    rows_out.append({"candidate_id": cid, "source_image": fut_s.result(),
                                     "edited_image": fut_e.result(),
                                     "source_is_anchor": self.keep_anchor_source,
                                     "gen_params": json.dumps(gp, default=float),
                                     "gen_run": ctx.run_id, "auto_status": "generated",
                                     "error": None})
                except OSError as e:
                    failed[cid] = f"cannot write media: {e}"
        df = pl.DataFrame(rows_out, schema={
            "candidate_id": pl.Int64, "source_image": pl.String, "edited_image": pl.String,
            "source_is_anchor": pl.Boolean, "gen_params": pl.String, "gen_run": pl.Int64,
            "auto_status": pl.String, "error": pl.String})
        return BatchResult(updates={"candidates": df}, failed=failed)


def _put_jpeg(ws: Workspace, im) -> str:
    return ws.media.put_bytes(to_jpeg_bytes(im, quality=100), "jpg")


# -- the library call behind `ultracurate generate` ------------------------------------------------
@dataclass
class GenerateSummary:
    plan: PlanReport
    run: RunSummary | None

    def to_json(self) -> dict:
        return {"plan": self.plan.to_json(), "run": self.run.to_json() if self.run else None}


def run_generate(ws: Workspace, selection: Selection | None = None, *, candidates: int = 30,
                 mode: str = "auto", behaviour: str = "method", engine: str = "local",
                 seed: int = 0, size: int = 512, keep_anchor_source: bool = False,
                 soft_variant: str = "ultraedit", address: str | None = None,
                 workers: int | None = None, device: str | None = None,
                 batch_size: int | None = None, force: bool = False,
                 progress: bool = True) -> GenerateSummary:
    """Plan up to `candidates` per selected edit, then generate every planned candidate of
    those edits. Rerunning resumes; --force also regenerates generated/failed ones."""
    selection = selection or Selection()
    stage = GenerateStage(size=size, keep_anchor_source=keep_anchor_source,
                          soft_variant=soft_variant, mode=mode, behaviour=behaviour,
                          candidates=candidates, seed=seed)
    eng = make_engine(engine, address, workers) if isinstance(engine, str) else engine
    with ws.catalog() as cat:
        report = plan_candidates(cat, None, candidates, seed, behaviour=behaviour, mode=mode,
                                 selection=selection)
        sql, prm = selected_keys_sql(cat.con, "edits_v", "edit_id", selection, None,
                                     "edit_id")
        edit_ids = [r[0] for r in cat.con.execute(sql, prm).fetchall()]
        stage.params["plan"] = report.to_json()
        if force:
            stage.default_where = "auto_status IN ('planned', 'generated', 'failed')"
        cand_sel = Selection(where="list_contains($_uc_edits, edit_id) AND "
                                   "candidate_index < $_uc_n",
                             params={"_uc_edits": edit_ids, "_uc_n": int(candidates)},
                             trusted=True)
        run = run_stage(ws, stage, cand_sel, force=force, engine=eng, device=device,
                        batch_size=batch_size, progress=progress, cat=cat)
    return GenerateSummary(report, run)
