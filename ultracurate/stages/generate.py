"""Generate candidate pairs for edits: plan the candidate rows, then render them call by call.

`plan_candidates` inserts the missing (edit_id, candidate_index) rows for the selected edits, up
to n_total per edit, each with a deterministic seed and its generator call (`gen_call`), status
'planned' (one idempotent, set-based insert in SQL: planning again adds nothing, planning more
adds only the new indices). A call is the candidates rendered together in one model call: for
`ultraedit-compat` one released call (7 free-form or 6 region pairs sharing a seed), for
`method` up to `pairs_per_call` pairs. `GenerateStage` renders planned rows call by call
(ultracurate.generation); the runner never splits a call across batches, so a candidate's
pixels depend on its call (fixed when planned), never on --batch-size or on where a killed run
stopped. It writes both images to the media store (JPEG quality 100, content-addressed, tmp +
rename) from wherever it runs, and returns the names; the driver records them. A run killed at
any point and rerun finishes the remaining calls.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


from .. import masks as M
from ..catalog import Catalog, named_queries, now
from ..errors import UltracurateError
from ..generation import params as P
from ..generation.behaviour import BEHAVIOURS, COMPAT, CallDropped
from ..images import resize_center_crop, to_jpeg_bytes
from ..names import CAPTION_MAX_WORDS, EDIT_MODES
from ..runner import BatchResult, Context, RowStage
from ..selection import Selection, referenced_columns, selected_keys_sql, top_n
from ..workspace import Workspace

DEFAULT_MASK_CLASSES = ("fine",)      # region generation takes other masks only when asked
# The seed formula of sql/queries/generate.sql (plan_candidates), recorded in each run's plan
# (params.plan.seeds): a new formula gets a new name. Runs without it planned with BLAKE2b.
SEED_FORMULA = "md5-v1"
PLAN_COLUMNS = ("candidate_id", "edit_id", "candidate_index", "seed", "gen_behaviour",
                "gen_params", "auto_status", "created_at", "gen_call")


@dataclass
class PlanReport:
    planned: int = 0                               # new candidate rows
    edits: int = 0                                 # edits with candidates to generate
    # reason -> skipped edits, reasons in the order of their first edit
    skipped_counts: dict[str, int] = field(default_factory=dict)
    # edit_id -> reason: plan_candidates' report; a stage's plan reports the counts only (a
    # plan may skip millions of edits)
    skipped: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"planned": self.planned, "edits": self.edits,
                "skipped": dict(self.skipped_counts), "seeds": SEED_FORMULA}


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


def _unclassified_classes(w, plan: str, needed: bool = True):
    """The mask class of each region edit of the plan (temp table) still planned without a
    stored class, as an Arrow table (edit_id, mask_class): from its stored features, or from
    its mask when it has none (none when not needed: no class filter)."""
    import numpy as np
    import pyarrow as pa
    rows = (w.query(named_queries("generate")["plan_unclassified"].replace("{plan}", plan))
            if needed else [])
    area = np.zeros(len(rows))
    contours = np.zeros(len(rows), dtype=np.int64)
    for i, e in enumerate(rows):
        if e["mask_area"] is None or e["mask_contours"] is None:
            try:
                f = M.rle_features(e["mask_rle"], e["mask_height"], e["mask_width"])
            except Exception as err:   # pycocotools' and numpy's errors alike
                raise UltracurateError(f"edit {e['edit_id']}: cannot read its mask to "
                                       f"classify it: {err}") from None
            area[i], contours[i] = f.area, f.contours
        else:
            area[i], contours[i] = e["mask_area"], e["mask_contours"]
    return pa.table({"edit_id": pa.array([e["edit_id"] for e in rows], pa.int64()),
                     "mask_class": pa.array(M.classify_many(area, contours), pa.string())})


def plan_candidates(cat: Catalog, selection: Selection | None, n_total: int, seed: int = 0,
                    **options) -> PlanReport:
    """Add the missing candidates 0..n_total-1 of each edit the selection picks, status
    'planned', in one transaction (options: those of `plan_sql`)."""
    from ..runner import Access
    selection = selection or Selection()
    sql, params = selected_keys_sql(cat.con, "edits_v", "edit_id", selection, None, "edit_id")
    with cat.transaction():
        return plan_sql(Access(cat, GenerateStage, writable=True), selection, sql, params,
                        n_total, seed, per_edit=True, **options)


def plan_sql(w, selection: Selection, edits_sql: str, params: dict, n_total: int,
             seed: int = 0, *, behaviour: str = "method", mode: str = "auto",
             mask_class: str | None = None, pairs_per_call: int | None = None,
             size: int | None = None, native_size: int | None = None,
             per_edit: bool = False) -> PlanReport:
    """Add the missing candidates 0..n_total-1 of each edit edits_sql selects (its edit_id;
    selection: the user's, to see whether its --where reads mask_class), status 'planned'.
    Call inside the caller's transaction (w: the stage's catalog handle). Set-based: the
    queries of sql/queries/generate.sql over temp tables, one INSERT ... SELECT of the new
    rows; no Python object per edit or candidate (but a region edit whose mask class must
    be computed: one without a stored class).

    Calls and seeds: the edits of one mode, in edit_id order, are taken the behaviour's pairs
    per call at a time (`method`: pairs_per_call, 16 by default; `ultraedit-compat`: the
    released 7 free-form / 6 region), one call per candidate index. `method` seeds each
    candidate from (seed, edit_id, index); `ultraedit-compat` gives a call one 32-bit seed
    (the formula: sql/queries/generate.sql, plan_candidates; docs/generation.md).

    An edit whose caption is over CAPTION_MAX_WORDS words, or a region edit without a
    grounded mask, is skipped; region edits are planned only when their mask class is in
    mask_class (default 'fine'; 'any', or a --where that reads mask_class, takes every class).
    Skipped edits are counted per reason (per_edit: and listed with it, report.skipped).
    `ultraedit-compat` renders region edits at the editor's native size only (native_size:
    the released inpaint pipeline's unet.sample_size * 8), so another size is refused before
    anything is written."""
    rules = PlanRules.of(w, selection, n_total, seed, behaviour=behaviour, mode=mode,
                         mask_class=mask_class, pairs_per_call=pairs_per_call)
    report = PlanReport()
    rules.plan(w, edits_sql, params, report, per_edit=per_edit,
               refuse_size=(size, native_size))
    return report


@dataclass
class PlanRules:
    """A plan's settings, checked (plan_sql's options), and the planning of one set of
    edits with them (`plan`)."""
    behaviour: str
    mode: str
    n_total: int
    seed: int
    per_call: dict[str, int]
    classes: tuple[str, ...] | None     # None: every mask class

    @classmethod
    def of(cls, w, selection: Selection, n_total: int, seed: int = 0, *,
           behaviour: str = "method", mode: str = "auto", mask_class: str | None = None,
           pairs_per_call: int | None = None) -> "PlanRules":
        if behaviour not in BEHAVIOURS:
            raise UltracurateError(f"unknown behaviour '{behaviour}' (method or "
                                   "ultraedit-compat)")
        if n_total < 1:
            raise UltracurateError("--candidates must be at least 1")
        if mode not in EDIT_MODES:
            raise UltracurateError(f"unknown --mode '{mode}' (auto, free or region)")
        per_call = dict(BEHAVIOURS[behaviour].pairs_per_call)
        if pairs_per_call is not None:
            if behaviour == COMPAT:
                raise UltracurateError("--pairs-per-call is for --behaviour method (a released "
                                       "call holds 7 free-form or 6 region pairs)")
            if pairs_per_call < 1:
                raise UltracurateError("--pairs-per-call must be at least 1")
            per_call = {m: int(pairs_per_call) for m in per_call}
        classes = mask_classes(mask_class)
        if mask_class is None and "mask_class" in referenced_columns(w.cat.con, "edits_v",
                                                                     selection):
            classes = None            # the user's --where picks the mask classes
        return cls(behaviour, mode, int(n_total), int(seed), per_call, classes)

    def plan(self, w, edits_sql: str, params: dict, report: PlanReport, *,
             numbered: dict[str, int] | None = None,
             waiting: dict[str, list[int]] | None = None, last: bool = True,
             per_edit: bool = False, refuse_size: tuple = (None, None)) -> tuple[int, int]:
        """Decide and plan the edits edits_sql selects (see plan_sql), adding to report;
        returns the first candidate_id it gave and how many rows it added. A plan over
        windows of edits (PlanWindows) passes its state: numbered (mode -> edits numbered
        into calls so far: the first edits of this one's), waiting (mode -> edits decided
        before whose call was not full: this one's calls start with them; updated) and
        last (False: a call this window leaves not full waits for the next one)."""
        bh = BEHAVIOURS[self.behaviour]
        classes = self.classes
        numbered = numbered if numbered is not None else {"free": 0, "region": 0}
        waiting = waiting if waiting is not None else {"free": [], "region": []}
        q = named_queries("generate")
        with w.materialized(q["plan_edits"].replace("{edits}", edits_sql),
                            {**params, "_ucp_mode": self.mode,
                             "_ucp_max_words": CAPTION_MAX_WORDS}) as plan, \
                w.registered(_unclassified_classes(w, plan, classes is not None)) as computed, \
                w.materialized(q["plan_decided"].replace("{plan}", plan)
                               .replace("{classes}", computed),
                               {"_ucp_by_class": classes is not None,
                                "_ucp_classes": list(classes or M.MASK_CLASSES)}) as decided:
            planned = dict.fromkeys(self.per_call, 0)     # mode -> edits to plan (new ones)
            for r in w.query(q["plan_summary"].replace("{decided}", decided)):
                if r["reason"] is None:
                    report.edits += r["n"]
                    planned[r["m"]] += r["n"]
                else:
                    report.skipped_counts[r["reason"]] = (
                        report.skipped_counts.get(r["reason"], 0) + r["n"])
            if per_edit:
                report.skipped = {e: r for r in report.skipped_counts for e in w.cat.con.execute(
                    q["plan_skipped_edits"].replace("{decided}", decided),
                    {"_ucp_reason": r}).fetchnumpy()["edit_id"].tolist()}
            size, native_size = refuse_size
            if (bh.region_at_native_size and native_size and size != native_size
                    and planned["region"]):
                raise UltracurateError(
                    f"ultraedit-compat renders region edits at the editor's native size, "
                    f"{native_size} px (the released inpaint pipeline works at "
                    f"unet.sample_size * 8), not --size {size}: use --size {native_size}, "
                    "--mode free, or --behaviour method")
            for m, ids in waiting.items():     # decided before: planned, not skipped
                if ids:
                    w.cat.con.execute(f"INSERT INTO {decided} SELECT unnest($ids), $m, NULL",
                                      {"ids": ids, "m": m})
            # mode -> edits numbered into calls by this window: all, or whole calls only
            taken = {m: planned[m] + len(waiting[m]) for m in planned}
            if not last:
                taken = {m: n - n % self.per_call[m] for m, n in taken.items()}
            first, added = w.candidates.next_id(), 0
            if any(taken.values()):
                added = w.candidates.insert_from(
                    q["plan_candidates"].replace("{decided}", decided),
                    {"_ucp_n": self.n_total, "_ucp_per_free": self.per_call["free"],
                     "_ucp_per_region": self.per_call["region"],
                     "_ucp_from_free": numbered["free"],
                     "_ucp_from_region": numbered["region"],
                     "_ucp_upto_free": numbered["free"] + taken["free"],
                     "_ucp_upto_region": numbered["region"] + taken["region"],
                     "_ucp_first": first, "_ucp_seed": self.seed,
                     "_ucp_seed_per_call": bh.seed_per_call, "_ucp_seed_bits": bh.seed_bits,
                     "_ucp_behaviour": self.behaviour, "_ucp_at": now()}, PLAN_COLUMNS)
                report.planned += added
            for m in waiting:
                if taken[m] < planned[m] + len(waiting[m]):
                    waiting[m] = w.cat.con.execute(
                        q["plan_waiting"].replace("{decided}", decided),
                        {"_ucp_m": m, "_ucp_skip": taken[m]}).fetchnumpy()["edit_id"].tolist()
                else:
                    waiting[m] = []
                numbered[m] += taken[m]
        return first, added


class PlanWindows:
    """generate's plan a window of edit ids at a time, so that a job over millions of edits
    starts its first batch after planning a few thousand (the runner plans the next window
    when its pending rows need more: RowStage.plan_next). Windows follow each other up the
    edit ids; a mode's edits are numbered into calls across windows, and a call a window
    leaves not full waits for the next (its edits are carried, decided, into it), so every
    call is planned whole and is the call a plan in one go gives, with the same seeds: only
    the candidate ids differ. The first window spans FIRST edit ids; each next one four
    times the last, up to MAX (a window holds the commits' connection while it plans: at
    4.1M edits, 262k ids plan about 14k candidates in a few tenths of a second)."""

    FIRST = 16_384
    MAX = 262_144

    def __init__(self, w, rules: PlanRules, selection: Selection):
        from ..selection import key_bounds, key_window
        self.rules, self.report = rules, PlanReport()
        # the selection's SQL once (its --where checked on this connection), windows bound
        # as parameters: a window's predicate reaches the scans of edits and anchors
        self.sql, self.params = w.selected(selection, "edits", "edit_id",
                                           key_window("edits", "edit_id", "_ucp_w"))
        found = key_bounds(w.cat.con, "edits", "edit_id")
        self.next, self.hi = (found[0], found[1]) if found else (1, 0)
        self.span = self.FIRST
        self.numbered = {"free": 0, "region": 0}
        self.waiting: dict[str, list[int]] = {"free": [], "region": []}

    @property
    def done(self) -> bool:
        return self.next > self.hi

    def step(self, w) -> tuple[int, int]:
        """Plan the next window in the caller's transaction: (first candidate_id, rows)."""
        from ..selection import key_window_params
        lo = self.next
        hi = min(lo + self.span, self.hi + 1)
        window = key_window_params(w.cat.con, "edits", "edit_id", lo, hi, "_ucp_w")
        got = self.rules.plan(w, self.sql, {**self.params, **window}, self.report,
                              numbered=self.numbered, waiting=self.waiting,
                              last=hi > self.hi)
        self.next, self.span = hi, min(self.span * 4, self.MAX)
        return got


# -- the stage ------------------------------------------------------------------------------------
class GenerateStage(RowStage):
    """Plan the selected edits' candidates (the user's selection is over edits), then render
    the planned ones call by call."""

    name = "generate"
    table = "candidates"
    selects = "edits"             # the candidates of the edits the user selects
    default_where = "auto_status = 'planned' AND candidate_index < $_uc_n"
    force_where = ("auto_status IN ('planned', 'generated', 'failed') "
                   "AND candidate_index < $_uc_n")
    columns = ("candidate_id, edit_id, candidate_index, seed, gen_behaviour, gen_params, "
               "gen_call, source_caption, target_caption, anchor_media, mask_rle, "
               "mask_height, mask_width")
    writes = {"candidates": {"edit_id", "candidate_index", "seed", "gen_behaviour",  # plan
                             "gen_params", "auto_status", "created_at", "gen_call",
                             "source_image", "edited_image", "source_is_anchor",  # render
                             "gen_run", "error"}}
    batch_size = 16
    group_by = "gen_call"          # a batch never splits a generator call
    roles = ("editor",)

    def __init__(self, candidates: int = 30, mode: str = "auto", behaviour: str = "method",
                 seed: int = 0, size: int = 512, keep_anchor_source: bool = False,
                 soft_variant: str = "ultraedit", mask_class: str | None = None,
                 pairs_per_call: int | None = None, dtype: str | None = None,
                 write_threads: int = 4):
        """Plan up to `candidates` per selected edit, then generate every planned candidate
        of those edits (see the module docstring). Rerunning resumes; --force also
        regenerates generated and failed ones."""
        super().__init__(size=size, keep_anchor_source=keep_anchor_source,
                         soft_variant=soft_variant, dtype=dtype, mode=mode,
                         behaviour=behaviour, candidates=candidates, seed=seed,
                         mask_class=mask_class, pairs_per_call=pairs_per_call)
        if size % 8 or size < 64:
            raise UltracurateError(f"--size must be a multiple of 8, at least 64 (got {size})")
        if behaviour not in BEHAVIOURS:
            raise UltracurateError(f"unknown behaviour '{behaviour}' (method or "
                                   "ultraedit-compat)")
        if int(candidates) < 1:
            raise UltracurateError("--candidates must be at least 1")
        mask_classes(mask_class)  # a bad --mask-class is refused before anything is written
        self.candidates, self.mode, self.behaviour = int(candidates), mode, behaviour
        self.seed, self.mask_class, self.pairs_per_call = int(seed), mask_class, pairs_per_call
        self.size, self.keep_anchor_source = int(size), bool(keep_anchor_source)
        self.soft_variant, self.dtype, self.write_threads = soft_variant, dtype, write_threads
        self.native_size: int | None = None
        self.planned: PlanReport | None = None
        self._windows: PlanWindows | None = None
        self.pipe = None
        self._pool: ThreadPoolExecutor | None = None

    def check(self, r, selection) -> None:
        if self.behaviour == COMPAT and self.mode != "free":
            from ..models import editor, resolve
            self.native_size = editor.native_size(resolve(r.workspace, "editor"))

    def sql_params(self) -> dict:
        return {"_uc_n": self.candidates}

    def plan(self, w, selection, parent_sql, params) -> dict:
        """Plan the first window of edits (PlanWindows; the runner asks for the rest as its
        pending rows need them), or every edit at once: under --limit/--sample (picked over
        the whole selection), and when ultraedit-compat may be refused a size (before
        anything is written)."""
        rules = PlanRules.of(w, selection, self.candidates, self.seed,
                             behaviour=self.behaviour, mode=self.mode,
                             mask_class=self.mask_class, pairs_per_call=self.pairs_per_call)
        self._windows = None
        refusable = (BEHAVIOURS[self.behaviour].region_at_native_size and self.native_size
                     and self.size != self.native_size)
        if refusable or top_n(selection):
            self.planned = PlanReport()
            rules.plan(w, parent_sql, params, self.planned,
                       refuse_size=(self.size, self.native_size))
        else:
            self._windows = PlanWindows(w, rules, selection)
            self.planned = self._windows.report
            self._windows.step(w)
        return self.planned.to_json()

    @property
    def plan_left(self) -> bool:
        return self._windows is not None and not self._windows.done

    def plan_next(self, w) -> tuple[int, int]:
        return self._windows.step(w)

    def report(self, w) -> dict:
        plan = self.planned.to_json() if self.planned else None
        notes = []
        if plan is not None:
            skipped = ", ".join(f"{n} {r}" for r, n in plan["skipped"].items()) or "none"
            notes.append(f"planned {plan['planned']} new candidates for {plan['edits']} "
                         f"edits (skipped edits: {skipped})")
        return {"plan": plan, "notes": notes}

    def __getstate__(self):  # ship the settings to a worker, never the loaded model
        state = self.__dict__.copy()
        state["pipe"] = state["_pool"] = state["_windows"] = None
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
                    out[name] = resize_center_crop(ws.media.load_rgb(name), self.size)
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
        pool = self._writers()
        n_calls_rows, started = sum(len(m) for m in calls.values()), 0
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
                # JPEG encoding and writes run on threads while the next call (and the next
                # batch: see complete) runs.
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

        def complete() -> BatchResult:
            """The batch's rows once its images are written (on the runner's commit thread,
            while the next batch renders)."""
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
                          "source_is_anchor": None, "gen_params": planned,
                          "gen_run": ctx.run_id, "auto_status": "failed", "error": why}
                         for cid, (why, planned) in dropped.items()]
            failed.update({cid: why for cid, (why, _) in dropped.items()})
            return BatchResult(updates={"candidates": rows_out}, failed=failed)
        return BatchResult(complete=complete)

    def _writers(self) -> ThreadPoolExecutor:
        """The threads that encode and write images, kept for the whole job (a batch's writes
        finish while the next one renders)."""
        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(self.write_threads,
                                            thread_name_prefix="uc-generate-write")
        return self._pool

    def finish(self, w) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


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
