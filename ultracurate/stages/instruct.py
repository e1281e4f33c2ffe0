"""Instruct: write candidate edits (instruction, target caption, edit object, type, mode) from
anchors' captions with an LLM primed by human exemplars, or with the offline rule back-end.

Runs over anchors; inserts `edits` rows. The types each anchor gets are planned up front over
the whole selection (round-robin over --types, or spread by --quota), so that a rerun plans the
same and the catalog starts balanced. Each answer is validated; an invalid one is asked again
(a new seed, the anchor's next caption) up to max_attempts, then recorded as an edits row with
edit_status 'invalid' and its reasons, so that `stats` shows it and no later stage picks it up.
A back-end that cannot be reached fails the anchor (nothing of it is written) so a rerun
redoes it. Nothing here touches the catalog except `write`, on the driver.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..catalog import now
from ..errors import UltracurateError, redact
from ..instruct.backends import Answer, BackendSpec, Request, spec_from_role
from ..instruct.captions import parse_sources, source_matches
from ..instruct.plan import derive_seed, parse_quota, parse_types, plan_types_at
from ..instruct.validation import Proposal, validate
from ..names import CAPTION_MAX_WORDS, EDIT_MODES
from ..runner import ORDINAL, BatchResult, Context, RowStage


EDIT_COLUMNS = {"edit_id", "anchor_id", "source_caption", "instruction", "target_caption",
                "edit_object", "edit_type", "mode", "edit_status", "edit_reasons",
                "instruct_backend", "instruct_model", "prompt_version", "exemplar_ids",
                "instruct_seed", "instruct_run", "created_at"}


# The anchor's captions instruct may use (over anchors_v): from the chosen sources
# ($_uc_sources, NULL: every source; 'caption:*' a prefix), 1 to $_uc_max_words words (stored
# captions are whitespace-normalised: one space between words).
USABLE_CAPTIONS = (
    "[captions[i] FOR i IN range(1, len(captions) + 1) IF "
    "len(string_split(captions[i], ' ')) <= $_uc_max_words AND ($_uc_sources IS NULL OR "
    "len([p FOR p IN $_uc_sources IF CASE WHEN suffix(p, '*') THEN starts_with("
    "caption_sources[i], left(p, length(p) - 1)) ELSE caption_sources[i] = p END]) > 0)]")


@dataclass
class _Slot:
    anchor_id: int
    index: int            # the slot's number within its anchor
    edit_type: str
    captions: list[str]
    offset: int           # which caption the first attempt uses
    reasons: list[str] = field(default_factory=list)
    last_raw: str = ""
    request: Request | None = None
    proposal: Proposal | None = None


class InstructStage(RowStage):
    name = "instruct"
    table = "anchors"
    columns = f"anchor_id, captions, caption_sources, {USABLE_CAPTIONS} AS usable"
    # The types are dealt over the anchors of the whole selection with a usable caption (in
    # id order, done ones included), so that a rerun deals each anchor the same; an anchor
    # without one stays in to be failed with the reason; one the quota leaves nothing to is
    # not work.
    ordinal_where = f"len({USABLE_CAPTIONS}) > 0"
    default_where = f"{ORDINAL} IS NULL OR {ORDINAL} * $_uc_per_anchor < $_uc_slots"
    writes = {"edits": {"anchor_id", "source_caption", "instruction", "target_caption",
                        "edit_object", "edit_type", "mode", "edit_status", "edit_reasons",
                        "instruct_backend", "instruct_model", "prompt_version", "exemplar_ids",
                        "instruct_seed", "instruct_run", "created_at"}}
    batch_size = 16
    roles = ("llm",)  # what runs.models records (the back-end, not necessarily a model)

    def __init__(self, per_anchor: int = 1, types: list[str] | str | None = None,
                 quota: dict | str | None = None, backend: str | None = None,
                 model: str | None = None, base_url: str | None = None,
                 api_key: str | None = None, prompt: str | None = None, seed: int = 0,
                 exemplars: str | Path | None = None, n_instruction_examples: int = 50,
                 n_full_examples: int = 10, max_attempts: int = 3, mode: str = "auto",
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 1.0, temperature: float = 0.7, max_new_tokens: int = 256,
                 llm_batch_size: int = 8, dtype: str | None = None,
                 max_caption_words: int = CAPTION_MAX_WORDS,
                 caption_source: str | list[str] | None = None,
                 spec: BackendSpec | None = None):
        """Write `per_anchor` candidate edits for each selected anchor (types round-robin
        over `types`, or spread by `quota` {type: total}) and insert them into `edits`.

        caption_source: which captions to write from ('coco', 'caption:*', a comma-separated
        list; default every source). An anchor without a usable caption is failed with the
        reason.

        backend: 'rule' (offline), 'openai' (chat-completions server at base_url, or
        $ULTRACURATE_LLM_BASE_URL / $OPENAI_BASE_URL; key from api_key or
        $ULTRACURATE_LLM_API_KEY / $OPENAI_API_KEY) or 'transformers' (model: hub id or
        path; default the workspace's llm role). None: the workspace's `[models] llm` when
        set, else 'rule'."""
        self.per_anchor = int(per_anchor)
        if self.per_anchor < 1:
            raise UltracurateError("--per-anchor must be at least 1")
        self.types = parse_types(types)
        self.quota = parse_quota(quota)
        if mode not in EDIT_MODES:
            raise UltracurateError(f"unknown mode '{mode}' ({', '.join(EDIT_MODES)})")
        if max_attempts < 1:
            raise UltracurateError("max_attempts must be at least 1")
        self.seed, self.mode, self.max_attempts = int(seed), mode, int(max_attempts)
        self.exemplars_path = str(exemplars) if exemplars else None
        self.n_instr, self.n_full = int(n_instruction_examples), int(n_full_examples)
        self.max_caption_words = max_caption_words
        self.caption_source = parse_sources(caption_source)
        self._spec_options = dict(backend=backend, model=model, base_url=base_url,
                                  api_key=api_key, prompt=prompt, concurrency=concurrency,
                                  timeout=timeout, max_retries=max_retries, backoff=backoff,
                                  temperature=temperature, max_new_tokens=max_new_tokens,
                                  batch_size=llm_batch_size, dtype=dtype)
        self.spec = spec
        super().__init__(per_anchor=self.per_anchor, types=self.types, quota=self.quota,
                         seed=self.seed,
                         exemplars=self.exemplars_path or "ultracurate/data/exemplars.jsonl",
                         n_instruction_examples=self.n_instr, n_full_examples=self.n_full,
                         max_attempts=self.max_attempts, mode=mode,
                         max_caption_words=max_caption_words,
                         caption_source=self.caption_source)
        self._backend = None
        self._exemplars = None

    # -- driver side ---------------------------------------------------------------------
    def check(self, r, selection) -> None:
        """The back-end (explicit, else the workspace's llm role, else rule) and, for a model,
        its exemplar file: one clear error before the run. runs.params records the back-end
        without its API key."""
        if self.spec is None:
            self.spec = backend_spec(r.workspace, **self._spec_options)
        self.params = {"backend": self.spec.public(), **self.params}
        if self.spec.backend != "rule":  # fail early on a bad exemplar file
            from ..instruct.exemplars import load_exemplars
            load_exemplars(self.exemplars_path)

    def sql_params(self) -> dict:
        slots = sum(self.quota.values()) if self.quota is not None else 2 ** 62
        return {"_uc_max_words": int(self.max_caption_words),
                "_uc_sources": self.caption_source, "_uc_per_anchor": self.per_anchor,
                "_uc_slots": slots}

    def models(self, ctx: Context) -> dict:
        from ..models import describe
        out = describe(ctx.workspace, ())
        out["llm"] = {k: v for k, v in self.spec.public().items()
                      if k in ("backend", "model", "base_url", "prompt")}
        return out

    def write(self, w, result: BatchResult) -> None:
        rows = result.extra.get("edits", [])
        if not rows:
            return
        first = w.edits.next_id()
        at = now()
        for i, r in enumerate(rows):
            r["edit_id"] = first + i
            r["instruct_run"] = w.run_id
            r["created_at"] = at
        w.edits.insert(rows)

    def finish(self, w) -> None:
        if self._backend is not None:
            self._backend.close()

    # -- worker side ----------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        self._backend = self.spec.build(ctx.device)
        if self._backend.uses_exemplars:
            from ..instruct.exemplars import load_exemplars
            self._exemplars = load_exemplars(self.exemplars_path)

    def process(self, rows: list[dict], prepared, ctx: Context) -> BatchResult:
        backend = self._backend
        failed: dict[int, str] = {}
        slots: list[_Slot] = []
        for row in rows:
            aid = row["anchor_id"]
            caps = row["usable"]
            if not caps:
                failed[aid] = self._no_caption(aid, row["captions"], row["caption_sources"])
                continue
            offset = random.Random(derive_seed(self.seed, aid)).randrange(len(caps))
            plan = plan_types_at(row[ORDINAL], self.per_anchor, self.types, self.quota)
            for j, t in enumerate(plan):
                slots.append(_Slot(aid, j, t, caps, offset))

        pending = slots
        for attempt in range(self.max_attempts):
            pending = [s for s in pending if s.anchor_id not in failed]
            if not pending:
                break
            requests = [self._request(s, attempt) for s in pending]
            answers = backend.complete(requests)
            still = []
            for s, req, ans in zip(pending, requests, answers):
                if ans.error:
                    failed.setdefault(s.anchor_id, f"{backend.name}: {ans.error}")
                    continue
                proposal, reasons = self._judge(ans, req)
                if proposal is not None:
                    s.request, s.proposal = req, proposal
                else:
                    s.request = req
                    s.reasons += [f"try {attempt + 1}: {r}" for r in reasons]
                    s.last_raw = _raw_text(ans)
                    still.append(s)
            pending = still

        edits = [self._row(s, backend) for s in slots if s.anchor_id not in failed]
        return BatchResult(extra={"edits": edits}, failed=failed)

    def _no_caption(self, aid: int, captions, sources) -> str:
        """Why an anchor has no usable caption, and what fixes it."""
        if not captions:
            return (f"anchor {aid}: no caption (write one with `ultracurate caption`, or "
                    "ingest a captions table for it)")
        if not any(source_matches(s, self.caption_source) for s in sources):
            return (f"anchor {aid}: no caption from source {','.join(self.caption_source)} "
                    f"(it has {', '.join(sorted(set(sources)))})")
        return f"anchor {aid}: no caption of 1 to {self.max_caption_words} words"

    def _request(self, s: _Slot, attempt: int) -> Request:
        seed = derive_seed(self.seed, s.anchor_id, s.index, attempt)
        caption = s.captions[(s.offset + s.index + attempt) % len(s.captions)]
        req = Request(caption, s.edit_type, seed)
        if self._backend.uses_exemplars:
            from ..instruct.exemplars import sample
            req.instruction_examples, req.full_examples = sample(
                self._exemplars, s.edit_type, self.n_instr, self.n_full, random.Random(seed))
        return req

    @staticmethod
    def _judge(ans: Answer, req: Request) -> tuple[Proposal | None, list[str]]:
        if ans.invalid:
            return None, [ans.invalid]
        return validate(ans.content, req.source_caption, req.edit_type)

    def _row(self, s: _Slot, backend) -> dict:
        req = s.request
        base = {"anchor_id": s.anchor_id, "source_caption": req.source_caption,
                "instruct_backend": backend.name, "instruct_model": backend.model,
                "prompt_version": backend.prompt_version,
                "exemplar_ids": req.exemplar_ids or None, "instruct_seed": req.seed}
        p = s.proposal
        if p is None:
            # a server's text is stored as it came, less any key it echoed
            return {**base, "instruction": redact(s.last_raw[:500]), "target_caption": "",
                    "edit_object": None, "edit_type": s.edit_type, "mode": "free",
                    "edit_status": "invalid", "edit_reasons": [redact(r) for r in s.reasons]}
        mode = self.mode if self.mode != "auto" else ("region" if p.is_local else "free")
        return {**base, "instruction": p.instruction, "target_caption": p.target_caption,
                "edit_object": p.edit_object, "edit_type": p.edit_type, "mode": mode,
                "edit_status": "proposed", "edit_reasons": None}


def _raw_text(ans: Answer) -> str:
    c = ans.content
    if c is None:
        return ""
    return c if isinstance(c, str) else str(c)


# -- the back-end -----------------------------------------------------------------------------
def backend_spec(ws, backend: str | None = None, **kw) -> BackendSpec:
    """The back-end to use: explicit, else the workspace's llm role if configured, else rule."""
    from ..models import resolve
    configured = ws.section("models").get("llm") if ws is not None else None
    if backend is None:
        spec = spec_from_role(str(configured)) if configured else BackendSpec("rule")
    else:
        spec = BackendSpec(backend)
        if backend == "openai" and configured and str(configured).startswith("http"):
            spec = spec_from_role(str(configured))
        if backend == "transformers" and not kw.get("model"):
            ref = resolve(ws, "llm")
            if ref == "rule" or ref.startswith(("http://", "https://")):
                raise UltracurateError("the transformers back-end needs --model (a hub id "
                                       "or a checkpoint folder); the workspace's llm role "
                                       f"is '{ref}'")
            spec.model = ref
    for k, v in kw.items():
        if v is not None and (k not in ("model", "base_url") or v):
            setattr(spec, k, v)
    if spec.backend not in ("rule", "openai", "transformers"):
        raise UltracurateError(f"unknown back-end '{spec.backend}' (rule, openai or "
                               "transformers)")
    return spec
