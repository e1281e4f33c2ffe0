"""Generate candidate pairs for edits: plan the candidate rows, then render them call by call.

`plan_candidates` inserts the missing (edit_id, candidate_index) rows for the selected edits, up
to n_total per edit, each with a deterministic seed and its generator call (`gen_call`), status
'planned' (one idempotent insert: planning again adds nothing, planning more adds only the new
indices). A call is the candidates rendered together in one model call: for `ultraedit-compat`
one released call (7 free-form or 6 region pairs sharing a seed), for `method` up to
`pairs_per_call` pairs. `GenerateStage` renders planned rows call by call (ultracurate.generation);
the runner never splits a call across batches, so a candidate's pixels depend on its call (fixed
when planned), never on --batch-size or on where a killed run stopped. It writes both images to
the media store (JPEG quality 100, content-addressed, tmp + rename) from wherever it runs, and
returns the names; the driver records them. A run killed at any point and rerun finishes the
remaining calls.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import polars as pl

from .. import masks as M
from ..catalog import Catalog, now
from ..errors import UltracurateError
from ..generation import params as P
from ..generation.behaviour import BEHAVIOURS, COMPAT, CallDropped
from ..images import load_rgb, resize_center_crop, to_jpeg_bytes
from ..runner import BatchResult, Context, RunSummary, Stage, make_engine, run_stage
from ..selection import Selection, referenced_columns, selected_keys_sql
from ..workspace import Workspace

MODES = ("auto", "free", "region")
DEFAULT_MASK_CLASSES = ("fine",)      # region generation skips other masks unless asked


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


def mask_classes(value: str | None) -> tuple[str, ...] | None:
    """--mask-class: a comma list of mask classes region generation takes, or 'any' (None:
    no class filter)."""
    if value is None:
        return DEFAULT_MASK_CLASSES
    names = tuple(v.strip() for v in str(value).split(",") if v.strip())
    if names == ("any",):
        return None
    bad = [n for n in names if n not in M.MASK_CLASSES]
    if bad or not names:
        raise UltracurateError(f"unknown --mask-class '{value}' (a comma list of "
                               f"{', '.join(M.MASK_CLASSES)}, or any)")
    return names


def _mask_class(edit: dict) -> str:
    """The edit's stored class, or the one its stored features give (not yet classified)."""
    if edit["mask_class"] is not None:
        return edit["mask_class"]
    if edit["mask_area"] is None or edit["mask_contours"] is None:
        f = M.rle_features(edit["mask_rle"], edit["mask_height"], edit["mask_width"])
        return M.classify(f.area, f.contours)
    return M.classify(edit["mask_area"], edit["mask_contours"])


def generation_mode(edit: dict, mode: str, classes: tuple[str, ...] | None = DEFAULT_MASK_CLASSES
                    ) -> tuple[str | None, str | None]:
    """(mode to generate the edit in, or None with the reason it is skipped)."""
    if mode not in MODES:
        raise UltracurateError(f"unknown --mode '{mode}' (auto, free or region)")
    if max(_words(edit["source_caption"]), _words(edit["target_caption"])) > P.MAX_CAPTION_WORDS:
        return None, f"caption over {P.MAX_CAPTION_WORDS} words"
    m = edit["mode"] if mode == "auto" else mode
    if m == "region" and (edit["edit_status"] != "grounded" or edit["mask_rle"] is None):
        return None, "region edit without a mask (not grounded)"
    if m == "region" and classes is not None:
        cls = _mask_class(edit)
        if cls not in classes:
            return None, (f"mask class {cls} (region generation takes "
                          f"--mask-class {','.join(classes)})")
    return m, None


def plan_candidates(cat: Catalog, edit_ids: list[int] | None, n_total: int, seed: int = 0, *,
                    behaviour: str = "method", mode: str = "auto",
                    selection: Selection | None = None, mask_class: str | None = None,
                    pairs_per_call: int | None = None, size: int | None = None,
                    native_size: int | None = None) -> PlanReport:
    """Add the missing candidates 0..n_total-1 of each edit (edit_ids, or the edits the
    selection picks), status 'planned', in one transaction.

    Calls and seeds: the edits of one mode, in edit_id order, are taken the behaviour's pairs
    per call at a time (`method`: pairs_per_call, 16 by default; `ultraedit-compat`: the
    released 7 free-form / 6 region), one call per candidate index. `method` seeds each
    candidate from (seed, edit_id, index); `ultraedit-compat` gives a call one 32-bit seed.

    Region edits are planned only when their mask class is in mask_class (default 'fine';
    'any', or a --where that reads mask_class, takes every class); skipped edits are
    reported with the reason. `ultraedit-compat` renders region edits at the editor's native
    size only (native_size: the released inpaint pipeline's unet.sample_size * 8), so another
    size is refused before anything is written."""
    if behaviour not in BEHAVIOURS:
        raise UltracurateError(f"unknown behaviour '{behaviour}' (method or ultraedit-compat)")
    bh = BEHAVIOURS[behaviour]
    if n_total < 1:
        raise UltracurateError("--candidates must be at least 1")
    per_call = dict(bh.pairs_per_call)
    if pairs_per_call is not None:
        if behaviour == COMPAT:
            raise UltracurateError("--pairs-per-call is for --behaviour method (a released "
                                   "call holds 7 free-form or 6 region pairs)")
        if pairs_per_call < 1:
            raise UltracurateError("--pairs-per-call must be at least 1")
        per_call = {m: int(pairs_per_call) for m in per_call}
    classes = mask_classes(mask_class)
    cols = ("edit_id, mode, edit_status, mask_rle, mask_height, mask_width, mask_area, "
            "mask_contours, mask_class, source_caption, target_caption")
    if edit_ids is not None:
        edits = cat.query(f"SELECT {cols} FROM edits_v WHERE list_contains(?, edit_id) "
                          "ORDER BY edit_id", [list(map(int, edit_ids))])
    else:
        selection = selection or Selection()
        if mask_class is None and "mask_class" in referenced_columns(cat.con, "edits_v",
                                                                     selection):
            classes = None            # the user's --where picks the mask classes
        sql, prm = selected_keys_sql(cat.con, "edits_v", "edit_id", selection, None, cols)
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
        m, why = generation_mode(e, mode, classes)
        if m is None:
            report.skipped[e["edit_id"]] = why
            continue
        if m == "region" and behaviour == COMPAT and native_size and size != native_size:
            raise UltracurateError(
                f"ultraedit-compat renders region edits at the editor's native size, "
                f"{native_size} px (the released inpaint pipeline works at unet.sample_size "
                f"* 8), not --size {size}: use --size {native_size}, --mode free, or "
                "--behaviour method")
        report.edits += 1
        group = ordinal[m] // per_call[m]
        ordinal[m] += 1
        for k in range(n_total):
            if k in have.get(e["edit_id"], ()):
                continue
            call = (k, 0 if m == "free" else 1, group)
            rows.append((call + (e["edit_id"],), {
                "edit_id": e["edit_id"], "candidate_index": k,
                "seed": bh.seed(seed, e["edit_id"], k, m, group), "gen_behaviour": behaviour,
                "gen_params": json.dumps({"mode": m}), "auto_status": "planned"}))
    if not rows:
        return report
    rows.sort(key=lambda r: r[0])  # a call's rows are contiguous
    cat.con.execute("BEGIN")
    try:
        first = cat.next_id("candidates")
        at = now()
        calls: dict[tuple, int] = {}       # a call is named by its first row's candidate_id
        df = pl.DataFrame([{"candidate_id": first + i, **r, "created_at": at,
                            "gen_call": calls.setdefault(order[:3], first + i)}
                           for i, (order, r) in enumerate(rows)])
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
               "gen_call, source_caption, target_caption, anchor_media, mask_rle, "
               "mask_height, mask_width")
    writes = {"candidates": {"source_image", "edited_image", "source_is_anchor", "gen_params",
                             "gen_run", "auto_status", "error"}}
    batch_size = 16
    group_by = "gen_call"          # a batch never splits a generator call
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

    def _check_native_size(self) -> None:
        from ..models.editor import pipe_native_size
        native = pipe_native_size(self.pipe)
        if native != self.size:
            raise UltracurateError(f"ultraedit-compat renders region edits at the editor's "
                                   f"native size, {native} px, not --size {self.size}")

    def _mask_fn(self, row: dict):
        from ..masks import soft_mask
        latent = (self.size // 8, self.size // 8)

        def fn(soft_value):
            return soft_mask(row["mask_rle"], row["mask_height"], row["mask_width"], latent,
                             variant=self.soft_variant, soft_value=soft_value,
                             crop=(self.size,))
        return fn

    def process(self, rows: list[dict], prepared: dict, ctx: Context) -> BatchResult:
        """Render the batch's calls, one model call each (a call's rows are all here: the
        runner never splits a gen_call)."""
        from ..generation import Pair, run_pairs
        from ..masks import soft_mask_settings

        failed: dict[int, str] = {}
        dropped: dict[int, tuple[str, str]] = {}     # id -> (reason, planned gen_params)
        calls: dict[object, list[tuple[dict, Pair]]] = {}
        for r in rows:
            anchor = prepared.get(r["anchor_media"])
            if isinstance(anchor, Exception):   # the call goes on without it, as released
                failed[r["candidate_id"]] = str(anchor)
                continue
            m = json.loads(r["gen_params"])["mode"]
            pair = Pair(r["source_caption"], r["target_caption"], anchor, {}, int(r["seed"]),
                        mask=self._mask_fn(r) if m == "region" else None)
            calls.setdefault(_call_key(r, m), []).append((r, pair))

        ws = ctx.workspace
        updates = []
        n_calls_rows, started = sum(len(m) for m in calls.values()), 0
        with ThreadPoolExecutor(self.write_threads) as pool:
            for members in calls.values():
                crows, pairs = [r for r, _ in members], [p for _, p in members]
                base, started = started, started + len(members)

                def step(i, n, base=base, k=len(members)):  # the bar moves per step
                    ctx.progress(base + k * i / n, n_calls_rows)
                bh = BEHAVIOURS[crows[0]["gen_behaviour"]]
                mode = json.loads(crows[0]["gen_params"])["mode"]
                try:
                    if mode == "region" and bh.region_at_native_size:
                        self._check_native_size()
                    bh.draw_call_params(pairs, mode, str(self.pipe.unet.device))
                    images = run_pairs(self.pipe, pairs, bh, on_step=step)
                except CallDropped as e:  # the released driver drops the whole call
                    dropped.update({r["candidate_id"]: (f"dropped: {e}", r["gen_params"])
                                    for r in crows})
                    continue
                except Exception as e:  # one failing call fails its rows, not the batch
                    msg = f"{type(e).__name__}: {e}".splitlines()[0]
                    failed.update({r["candidate_id"]: msg for r in crows})
                    continue
                for r, pair, img in zip(crows, pairs, images):
                    src_img = pair.anchor if self.keep_anchor_source else img.source
                    # JPEG encoding and writes run on threads while the next call runs.
                    fut_s = pool.submit(_put_jpeg, ws, src_img)
                    fut_e = pool.submit(_put_jpeg, ws, img.edited)
                    gp = dict(pair.params)
                    gp.update(behaviour=r["gen_behaviour"], size=self.size,
                              real_steps=P.real_steps(gp["total_steps"], gp["strength"]),
                              source_is_anchor=self.keep_anchor_source,
                              call_pairs=len(pairs))
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
        # A dropped call is final (rerunning it fails the same way): its rows are marked
        # failed with the reason, and only --force tries them again.
        rows_out += [{"candidate_id": cid, "source_image": None, "edited_image": None,
                      "source_is_anchor": None, "gen_params": planned, "gen_run": ctx.run_id,
                      "auto_status": "failed", "error": why}
                     for cid, (why, planned) in dropped.items()]
        df = pl.DataFrame(rows_out, schema={
            "candidate_id": pl.Int64, "source_image": pl.String, "edited_image": pl.String,
            "source_is_anchor": pl.Boolean, "gen_params": pl.String, "gen_run": pl.Int64,
            "auto_status": pl.String, "error": pl.String})
        failed.update({cid: why for cid, (why, _) in dropped.items()})
        return BatchResult(updates={"candidates": df}, failed=failed)


def _call_key(row: dict, mode: str):
    """The model call a row renders in: its gen_call; rows planned before gen_call existed
    fall back to what was then one call (a compat seed and mode, or a batch's method rows)."""
    if row.get("gen_call") is not None:
        return row["gen_call"]
    if row["gen_behaviour"] == COMPAT:
        return ("compat", int(row["seed"]), mode)
    return ("method", mode)


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
                 mask_class: str | None = None, pairs_per_call: int | None = None,
                 progress: bool = True) -> GenerateSummary:
    """Plan up to `candidates` per selected edit, then generate every planned candidate of
    those edits. Rerunning resumes; --force also regenerates generated/failed ones."""
    selection = selection or Selection()
    stage = GenerateStage(size=size, keep_anchor_source=keep_anchor_source,
                          soft_variant=soft_variant, mode=mode, behaviour=behaviour,
                          candidates=candidates, seed=seed, mask_class=mask_class,
                          pairs_per_call=pairs_per_call)
    eng = make_engine(engine, address, workers) if isinstance(engine, str) else engine
    native = None
    if behaviour == COMPAT and mode != "free":
        from ..models import editor, resolve
        native = editor.native_size(resolve(ws, "editor"))
    with ws.catalog() as cat:
        report = plan_candidates(cat, None, candidates, seed, behaviour=behaviour, mode=mode,
                                 selection=selection, mask_class=mask_class,
                                 pairs_per_call=pairs_per_call, size=size, native_size=native)
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
