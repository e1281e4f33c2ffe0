"""Judge: a vision-language model rates each selected candidate pair (beyond UltraEdit, which
kept pairs by CLIP scores alone; ImgEdit and OmniEdit filter with such a judge).

Runs over candidates with both images. By default it judges only the rows CLIP already passed
(the score rules of the last filter run, or UltraEdit's, before top-k: `verdict_sql`), so that
the judge's cost goes where it decides something; `--where` replaces that, `--sample N` takes a
seeded sample of it. Writes judge_instruction, judge_preservation, judge_quality (1-5),
judge_rationale, judge_model, judge_prompt and judge_run. An answer that fails validation is
asked again (served models, or sampling) up to max_attempts, then recorded with its reason
(judge_invalid_reason, scores NULL) and the row failed, so a rerun tries it again; a back-end
that cannot be reached fails the row with nothing written. `plan_judge` says beforehand how
many rows and requests a run would take (`--dry-run`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UltracurateError
from ..images import BadImage, load_rgb
from ..instruct.plan import derive_seed
from ..judge import Judge, JudgeSpec, judge_spec, load_prompt, validate_judgement
from ..runner import BatchResult, Context, RowStage
from ..selection import Selection
from ..thresholds import JUDGE_COLUMNS, Thresholds

OUTPUT_COLUMNS = (*JUDGE_COLUMNS, "judge_rationale", "judge_model", "judge_prompt",
                  "judge_invalid_reason", "judge_run")
MAX_ANSWER_CHARS = 200  # of an invalid answer, kept in its reason
WITH_IMAGES = "source_image IS NOT NULL AND edited_image IS NOT NULL"


class JudgeStage(RowStage):
    """Judge the selected candidates (default: those CLIP already passed, `clip_passed`) with
    the workspace's judge role, or the model / served endpoint given.

    backend: 'transformers' (model: hub id or folder of a chat VLM) or 'openai' (an
    OpenAI-compatible vision endpoint at base_url, or $ULTRACURATE_VLM_BASE_URL; model: its
    served name; key from api_key, $ULTRACURATE_VLM_API_KEY or $OPENAI_API_KEY). None: from
    the role. grammar: constrain a local model's decoding (the tiny judge's 'tiny-judge').
    json_schema (openai): ask for JUDGE_SCHEMA through response_format (default on)."""

    name = "judge"
    table = "candidates"
    default_where = WITH_IMAGES
    columns = "candidate_id, source_image, edited_image, instruction"
    writes = {"candidates": set(OUTPUT_COLUMNS)}
    batch_size = 16
    roles = ("judge",)

    def __init__(self, backend: str | None = None, model: str | None = None,
                 base_url: str | None = None, api_key: str | None = None,
                 prompt: str | None = None, grammar: str | None = None,
                 max_attempts: int = 2, seed: int = 0, concurrency: int | None = None,
                 timeout: float | None = None, max_retries: int | None = None,
                 backoff: float | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, image_size: int | None = None,
                 json_schema: bool | None = None, dtype: str | None = None,
                 spec: JudgeSpec | None = None):
        if max_attempts < 1:
            raise UltracurateError("--max-attempts must be at least 1")
        if grammar:  # a bad prompt or grammar is one clear error before any run
            from ..models.vlm import Grammar
            Grammar.load(grammar)
        if prompt:
            load_prompt(prompt)
        self._options = dict(backend=backend, model=model, base_url=base_url,
                             api_key=api_key, prompt=prompt, grammar=grammar,
                             concurrency=concurrency, timeout=timeout,
                             max_retries=max_retries, backoff=backoff,
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             image_size=image_size, json_schema=json_schema, dtype=dtype)
        self.spec = spec
        self.max_attempts, self.seed = int(max_attempts), int(seed)
        super().__init__(max_attempts=self.max_attempts, seed=self.seed)
        self._judge: Judge | None = None
        self.judged = 0
        self.invalid = 0

    @property
    def tries(self) -> int:
        """Asking again only helps when the answer can differ: sampling, or a served model."""
        return self.max_attempts if (self.spec.temperature > 0
                                     or self.spec.backend == "openai") else 1

    # -- driver side ---------------------------------------------------------------------
    def check(self, r, selection: Selection) -> None:
        """The judge from the options and the workspace's role (one clear error when it
        cannot be found); without a --where, the rows CLIP already passed."""
        if self.spec is None:
            self.spec = judge_spec(r.workspace, batch_size=self.batch_size, **self._options)
        self.params["judge"] = self.spec.public()
        if selection.where is None:
            self.default_where = f"({WITH_IMAGES}) AND ({clip_passed(r.cat)})"

    def models(self, ctx: Context) -> dict:
        from ..models import describe
        out = describe(ctx.workspace, ())
        out["judge"] = {k: v for k, v in self.spec.public().items()
                        if k in ("backend", "model", "base_url", "prompt", "grammar",
                                 "json_schema")}
        return out

    def write(self, w, result: BatchResult) -> None:
        super().write(w, result)
        rows = result.updates.get("candidates") or []
        invalid = sum(1 for r in rows if r["judge_invalid_reason"] is not None)
        self.invalid += invalid
        self.judged += len(rows) - invalid

    def finish(self, w) -> None:
        if self._judge is not None:
            self._judge.close()

    def report(self, w) -> dict:
        means = w.query(f"SELECT {', '.join(f'avg({c}) AS {c}' for c in JUDGE_COLUMNS)} "
                        "FROM candidates WHERE judge_run = ? AND judge_invalid_reason IS NULL",
                        [w.run_id])[0]
        notes = [f"judged {self.judged}"
                 + (" (mean " + ", ".join(f"{c.removeprefix('judge_')} {v:.2f}"
                                          for c, v in means.items() if v is not None) + ")"
                    if self.judged else "")
                 + f"; invalid answers kept with their reasons: {self.invalid}"
                 + (" (failed: a rerun asks again)" if self.invalid else "")]
        return {"judged": self.judged, "invalid_answers": self.invalid,
                "means": {c: means[c] for c in JUDGE_COLUMNS}, "notes": notes}

    # -- worker side ----------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        self.spec.batch_size = ctx.batch_size or self.batch_size  # the model's batch: the job's
        self._judge = self.spec.build(ctx.device)

    def prepare(self, rows: list[dict], ctx: Context) -> list:
        media = ctx.workspace.media
        out = []
        for r in rows:
            try:
                out.append(tuple(self._judge.encode(load_rgb(media.path(r[k])))
                                 for k in ("source_image", "edited_image")))
            except BadImage as e:
                out.append(BadImage(f"candidate {r['candidate_id']}: {e}"))
        return out

    def process(self, rows: list[dict], prepared, ctx: Context) -> BatchResult:
        judge = self._judge
        failed: dict[int, str] = {}
        pairs, instructions = {}, {}
        for r, p in zip(rows, prepared):
            if isinstance(p, BaseException):
                failed[r["candidate_id"]] = str(p)
            else:
                pairs[r["candidate_id"]], instructions[r["candidate_id"]] = p, r["instruction"]
        out: list[dict] = []
        last: dict[int, tuple[list[str], str]] = {}
        pending = list(pairs)
        for attempt in range(self.tries):
            if not pending:
                break
            answers = judge.judge([pairs[c] for c in pending],
                                  [instructions[c] for c in pending],
                                  [derive_seed(self.seed, c, attempt) for c in pending])
            still = []
            for cid, ans in zip(pending, answers):
                if ans.error:
                    failed[cid] = f"{judge.name}: {ans.error}"
                    continue
                verdict, reasons = ((None, [ans.invalid]) if ans.invalid
                                    else validate_judgement(ans.content))
                if verdict is not None:
                    out.append(self._row(cid, ctx, **verdict.columns()))
                    continue
                last[cid] = (reasons, _printable(ans.content))
                still.append(cid)
            pending = still
        for cid in pending:
            reasons, raw = last[cid]
            why = (f"no valid answer after {self.tries} {'try' if self.tries == 1 else 'tries'}"
                   f": {'; '.join(reasons)} (answer: {raw})")
            out.append(self._row(cid, ctx, judge_invalid_reason=why))
            failed[cid] = f"candidate {cid}: {why}"
        return BatchResult(updates={"candidates": out}, failed=failed)

    def _row(self, cid: int, ctx: Context, **values) -> dict:
        row = {"candidate_id": cid, **{c: None for c in OUTPUT_COLUMNS}}
        row.update(judge_model=self._judge.model, judge_prompt=self._judge.prompt_version,
                   judge_run=ctx.run_id, **values)
        return row


def _printable(content) -> str:
    """An answer as one line a person can read (control characters shown as U+FFFD)."""
    text = " ".join(str(content or "").split())
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in text)[:MAX_ANSWER_CHARS]


# -- what a run would do, and the run ---------------------------------------------------------
@dataclass
class JudgePlan:
    candidates: int      # rows a run would judge now (already judged ones skipped)
    requests: int        # one per candidate
    max_requests: int    # if every answer were invalid and asked again (transport retries apart)
    backend: str
    model: str | None
    where: str | None    # the selection's predicate (the CLIP-passed default, or the user's)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        return (f"judge: {self.candidates} candidates, {self.requests} requests to "
                f"{self.backend} {self.model}"
                + (f" (at most {self.max_requests} if invalid answers are asked again)"
                   if self.max_requests > self.requests else ""))


def clip_passed(cat) -> str:
    """The default selection: rows whose scores pass the score rules of the last filter run
    (UltraEdit's when none ran), before top-k."""
    from .filter import latest_thresholds, verdict_sql
    t = latest_thresholds(cat) or Thresholds.preset("ultraedit")
    return f"clip_sim_dir IS NOT NULL AND {verdict_sql(t)[0]}"


def plan_judge(ws, selection: Selection | None = None, *, force: bool = False,
               **options) -> JudgePlan:
    """How many candidates and requests `run(ws, "judge", selection, **options)` would take
    now (the runner's own pending rows: the rows it would judge)."""
    from ..runner import Access, pending_sql
    stage = JudgeStage(**options)
    selection = selection or Selection()
    with ws.catalog(read_only=True) as cat:
        stage.check(Access(cat, stage, workspace=ws), selection)
        selection.checked(cat.con, "candidates_v")
        sql, params = pending_sql(stage, cat, selection, force)
        n = int(cat.scalar(f"SELECT count(*) FROM ({sql}) pending", params))
        where = selection.where if selection.where is not None else clip_passed(cat)
    return JudgePlan(n, n, n * stage.tries, stage.spec.backend, stage.spec.model, where)
