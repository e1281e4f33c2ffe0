"""Caption: write captions for anchors with a captioning model, so that photos that came
without any can be instructed.

Runs over anchors (by default those without a usable caption; `all_anchors` for every selected
one); adds rows to anchor_captions with source `caption:<model>` and their provenance (model,
prompt version, run). Photos are decoded and encoded for the back-end on the prepare threads;
the back-end (a local image-text-to-text model, batched, or an OpenAI-compatible vision
endpoint, concurrent) answers each. Every answer is validated: a usable one becomes a caption;
an unusable one is kept with its reason (anchor_captions.invalid_reason, never used) and, when
asking again can give another answer (sampling, or a served model), asked again up to
max_attempts. An anchor left without a usable caption, or whose back-end could not be
reached, is failed with the reason, so a rerun tries it again.
"""

from __future__ import annotations

from ..captioners import (Captioner, CaptionerSpec, captioner_spec, load_prompt,
                          validate_caption)
from ..images import BadImage
from ..instruct.plan import derive_seed
from ..runner import BatchResult, Context, RowStage

# anchors with no usable caption (a trusted predicate over anchors_v, cheap at scale: an
# anti-join on anchor_captions instead of aggregating every anchor's captions)
WITHOUT_CAPTION = ("anchor_id NOT IN (SELECT anchor_id FROM anchor_captions "
                   "WHERE invalid_reason IS NULL)")
MAX_INVALID_CHARS = 500


class CaptionStage(RowStage):
    name = "caption"
    table = "anchors"
    default_where = WITHOUT_CAPTION
    columns = "anchor_id, media"
    writes = {"anchor_captions": {"anchor_id", "caption", "source", "model", "prompt",
                                  "invalid_reason"}}
    batch_size = 8
    roles = ("captioner",)

    def __init__(self, backend: str | None = None, model: str | None = None,
                 base_url: str | None = None, api_key: str | None = None,
                 prompt: str | None = None, prefix: str | None = None,
                 grammar: str | None = None, all_anchors: bool = False, max_attempts: int = 2,
                 seed: int = 0, concurrency: int | None = None, timeout: float | None = None,
                 max_retries: int | None = None, backoff: float | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None,
                 image_size: int | None = None, dtype: str | None = None,
                 spec: CaptionerSpec | None = None):
        """Caption the selected anchors that have no usable caption (all_anchors: every
        selected one) with the workspace's captioner role, or the model / served endpoint
        given.

        backend: 'transformers' (model: hub id or folder) or 'openai' (an OpenAI-compatible
        vision endpoint at base_url, or $ULTRACURATE_VLM_BASE_URL; model: its served name;
        key from api_key, $ULTRACURATE_VLM_API_KEY or $OPENAI_API_KEY). None: from the role.
        grammar: constrain a local model's decoding to a packaged or file grammar (the tiny
        demo model's 'tiny-caption')."""
        from ..errors import UltracurateError
        if max_attempts < 1:
            raise UltracurateError("max_attempts must be at least 1")
        # a bad prompt or grammar name is one clear error before any run is recorded
        if grammar:
            from ..models.vlm import Grammar
            Grammar.load(grammar)
        if prompt:
            load_prompt(prompt)
        self._options = dict(backend=backend, model=model, base_url=base_url, api_key=api_key,
                             prompt=prompt, prefix=prefix, grammar=grammar,
                             concurrency=concurrency, timeout=timeout, max_retries=max_retries,
                             backoff=backoff, max_new_tokens=max_new_tokens,
                             temperature=temperature, image_size=image_size, dtype=dtype)
        self.spec = spec
        self.all_anchors = bool(all_anchors)
        self.default_where = None if self.all_anchors else WITHOUT_CAPTION
        self.max_attempts, self.seed = int(max_attempts), int(seed)
        super().__init__(all_anchors=self.all_anchors, max_attempts=self.max_attempts,
                         seed=self.seed)
        self._captioner: Captioner | None = None
        self.captions_added = 0
        self.invalid_answers = 0

    # -- driver side ---------------------------------------------------------------------
    def check(self, r, selection) -> None:
        """The captioner from the options and the workspace's role (one clear error when it
        cannot be found); what runs.params records (never the API key)."""
        if self.spec is None:
            self.spec = captioner_spec(r.workspace, **self._options)
        self.source = self.spec.source
        self.params.update(captioner=self.spec.public(), source=self.source)

    def models(self, ctx: Context) -> dict:
        from ..models import describe
        out = describe(ctx.workspace, ())
        out["captioner"] = {k: v for k, v in self.spec.public().items()
                            if k in ("backend", "model", "base_url", "prompt", "grammar")}
        return out

    def write(self, w, result: BatchResult) -> None:
        rows = result.extra.get("captions", [])
        if w.force:  # a rerun of this captioner replaces its earlier captions of them
            w.anchor_captions.remove_source(sorted({r["anchor_id"] for r in rows}),
                                            self.source)
        self.captions_added += w.anchor_captions.merge(
            [r for r in rows if not r["invalid_reason"]], w.run_id)
        self.invalid_answers += w.anchor_captions.merge(
            [r for r in rows if r["invalid_reason"]], w.run_id)

    def finish(self, w) -> None:
        if self._captioner is not None:
            self._captioner.close()

    def report(self, w) -> dict:
        missing = int(w.named("captions", "without_caption")[0]["n"])
        notes = [f"new captions ({self.source}): {self.captions_added}, invalid answers kept "
                 f"with their reasons: {self.invalid_answers}"]
        if missing:
            notes.append(f"anchors still without a caption: {missing} (the failed ones are "
                         "retried by a rerun)")
        return {"captions_added": self.captions_added,
                "invalid_answers": self.invalid_answers,
                "anchors_without_caption": missing, "notes": notes}

    # -- worker side ----------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        self.spec.batch_size = ctx.batch_size or self.batch_size  # the model's batch: the job's
        self._captioner = self.spec.build(ctx.device)

    def prepare(self, rows: list[dict], ctx: Context) -> list:
        media = ctx.workspace.media
        out = []
        for r in rows:
            try:
                out.append(self._captioner.encode(media.load_rgb(r["media"])))
            except BadImage as e:
                out.append(BadImage(f"anchor {r['anchor_id']}: {e}"))
        return out

    def process(self, rows: list[dict], prepared, ctx: Context) -> BatchResult:
        cap = self._captioner
        failed: dict[int, str] = {}
        payload: dict[int, object] = {}
        for r, p in zip(rows, prepared):
            if isinstance(p, BaseException):
                failed[r["anchor_id"]] = str(p)
            else:
                payload[r["anchor_id"]] = p
        # asking again only helps when the answer can differ: sampling, or a served model
        tries = self.max_attempts if (self.spec.temperature > 0
                                      or self.spec.backend == "openai") else 1
        found: list[dict] = []
        last: dict[int, list[str]] = {}
        pending = list(payload)
        for attempt in range(tries):
            if not pending:
                break
            answers = cap.caption([payload[a] for a in pending],
                                  [derive_seed(self.seed, a, attempt) for a in pending])
            still = []
            for aid, ans in zip(pending, answers):
                if ans.error:
                    failed[aid] = f"{cap.name}: {ans.error}"
                    continue
                text, reasons = ((None, [ans.invalid]) if ans.invalid
                                 else validate_caption(ans.content))
                row = {"anchor_id": aid, "source": self.source, "model": cap.model,
                       "prompt": cap.prompt_version}
                if text is not None:
                    found.append({**row, "caption": text, "invalid_reason": None})
                    continue
                # kept as text a person can read: control characters shown as U+FFFD
                raw = "".join(ch if ch.isprintable() else "\ufffd" for ch in " ".join(
                    str(ans.content or "").split()))[:MAX_INVALID_CHARS]
                found.append({**row, "caption": raw, "invalid_reason": "; ".join(reasons)})
                last[aid] = reasons
                still.append(aid)
            pending = still
        for aid in pending:
            failed[aid] = (f"anchor {aid}: no usable caption after {tries} "
                           f"{'try' if tries == 1 else 'tries'} ({'; '.join(last[aid])})")
        return BatchResult(extra={"captions": found}, failed=failed)
