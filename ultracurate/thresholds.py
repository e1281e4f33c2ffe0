"""The keep rule's thresholds: the one place their defaults live (docs/method.md).

UltraEdit keeps a candidate pair when clip_sim_image >= 0.75 (free-form) or 0.70 (region),
clip_sim_dir >= 0.22, clip_sim_source >= 0.2, clip_sim_target >= 0.2 and dinov2_sim >= 0.4;
then, per edit, the top-k by clip_sim_dir: free-form 30 candidates, keep 4; region 100
candidates, keep 3, and the edit is dropped when fewer than 3 pass. The `ip2p` preset is
InstructPix2Pix's scheme as method.md gives it (100 candidates, keep 4, CLIP image-caption 0.2,
direction 0.2, image-image 0.7), for comparison.

    t = Thresholds.preset("ultraedit")
    t = t.override(clip_sim_dir_min=0.3)                # both modes
    t = t.override(mode="region", top_k=5)              # one mode
    t = t.override(clip_min=0.25)                       # shortcut: source and target
    t.rules("free")   # [Rule('clip_sim_image', '>=', 0.75), ...] in the funnel's order
    t = t.override(judge_instruction_min=4)             # a vision-language judge's score

Judge bounds (`judge_<aspect>_min`, aspects instruction, preservation, quality, each scored
1-5 by `ultracurate judge`) sit beside the CLIP ones; none is on by default. A row's *CLIP
verdict* is the score rules alone, its *judge verdict* the judge rules (or, when the keep rule
has none, every aspect at least DEFAULT_JUDGE_PASS): `verdict_rules` splits them, for the
report's confusion table and the review App's "judge disagrees with CLIP" view.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UltracurateError
from .names import MODES


# What the judge scores (candidates.judge_<aspect>), on a 1-5 scale.
JUDGE_ASPECTS = ("instruction", "preservation", "quality")
JUDGE_SCALE = (1, 5)
JUDGE_COLUMNS = tuple(f"judge_{a}" for a in JUDGE_ASPECTS)
# The judge's verdict when the keep rule has no judge bound: every aspect at least this.
DEFAULT_JUDGE_PASS = 4

# Score columns in the order the funnel applies them, with the range each can take.
SCORE_RANGES = {
    "clip_sim_image": (-1.0, 1.0),
    "clip_sim_dir": (-1.0, 1.0),
    "clip_sim_source": (-1.0, 1.0),
    "clip_sim_target": (-1.0, 1.0),
    "dinov2_sim": (-1.0, 1.0),
    "ssim": (-1.0, 1.0),
    "l1": (0.0, 1.0),
    "l2": (0.0, 1.0),
    **{c: (float(JUDGE_SCALE[0]), float(JUDGE_SCALE[1])) for c in JUDGE_COLUMNS},
}


@dataclass(frozen=True)
class Rule:
    column: str
    op: str          # '>=' (a minimum) or '<=' (a maximum)
    value: float

    @property
    def reason(self) -> str:
        """What a row failing this rule records, e.g. 'clip_sim_dir < 0.22'."""
        return f"{self.column} {'<' if self.op == '>=' else '>'} {self.value:g}"

    @property
    def name(self) -> str:
        return f"{self.column} {self.op} {self.value:g}"

    @property
    def is_judge(self) -> bool:
        return self.column in JUDGE_COLUMNS


@dataclass(frozen=True)
class ModeThresholds:
    """One mode's keep rule. None switches a bound off."""

    clip_sim_image_min: float | None = None
    clip_sim_image_max: float | None = None
    clip_sim_dir_min: float | None = None
    clip_sim_source_min: float | None = None
    clip_sim_target_min: float | None = None
    dinov2_sim_min: float | None = None
    dinov2_sim_max: float | None = None
    ssim_min: float | None = None
    ssim_max: float | None = None
    l1_max: float | None = None
    l2_max: float | None = None
    judge_instruction_min: float | None = None
    judge_preservation_min: float | None = None
    judge_quality_min: float | None = None
    top_k: int | None = None            # per edit, by clip_sim_dir; None: keep all that pass
    drop_if_fewer: bool = False         # region rule: drop the edit if fewer than top_k pass
    candidates: int | None = None       # candidates generated per edit (the scheme's size)

    def rules(self) -> list[Rule]:
        out = []
        for col in SCORE_RANGES:
            for suffix, op in (("min", ">="), ("max", "<=")):
                v = getattr(self, f"{col}_{suffix}", None)
                if v is not None:
                    out.append(Rule(col, op, float(v)))
        return out


BOUND_FIELDS = tuple(f.name for f in dataclasses.fields(ModeThresholds)
                     if f.name.endswith(("_min", "_max")))


@dataclass(frozen=True)
class Thresholds:
    modes: dict[str, ModeThresholds] = field(default_factory=dict)
    preset_name: str = "custom"

    @classmethod
    def preset(cls, name: str = "ultraedit") -> "Thresholds":
        if name not in PRESETS:
            raise UltracurateError(f"unknown thresholds preset '{name}' "
                                   f"(one of {', '.join(PRESETS)})")
        return cls(dict(PRESETS[name]), name)

    def __getitem__(self, mode: str) -> ModeThresholds:
        return self.modes[mode]

    def rules(self, mode: str) -> list[Rule]:
        return self.modes[mode].rules()

    def verdict_rules(self, mode: str) -> tuple[list[Rule], list[Rule]]:
        """(the CLIP verdict's rules, the judge verdict's rules) of mode: the score rules,
        and the judge rules, or every aspect >= DEFAULT_JUDGE_PASS when there are none."""
        rules = self.rules(mode) if mode in self.modes else []
        clip = [r for r in rules if not r.is_judge]
        judge = [r for r in rules if r.is_judge] or [
            Rule(c, ">=", float(DEFAULT_JUDGE_PASS)) for c in JUDGE_COLUMNS]
        return clip, judge

    def has_judge_rules(self) -> bool:
        return any(r.is_judge for r in self.all_rules())

    def all_rules(self) -> list[Rule]:
        """Every distinct rule of any mode, in funnel order (for reports)."""
        seen: list[Rule] = []
        for mode in MODES:
            for r in self.rules(mode):
                if r not in seen:
                    seen.append(r)
        return sorted(seen, key=lambda r: list(SCORE_RANGES).index(r.column))

    def override(self, mode: str | None = None, clip_min: float | None = None,
                 **values: Any) -> "Thresholds":
        """A copy with some values changed, for one mode or (mode=None) both. Keys are
        ModeThresholds fields; clip_min sets clip_sim_source_min and clip_sim_target_min.
        A value of None leaves the field as it is; `unset=("dinov2_sim_min",)` switches
        bounds off. The result is validated."""
        unset = values.pop("unset", ())
        if clip_min is not None:
            for key in ("clip_sim_source_min", "clip_sim_target_min"):
                if values.get(key) is None:
                    values[key] = clip_min
        known = {f.name for f in dataclasses.fields(ModeThresholds)}
        bad = sorted((set(values) | set(unset)) - known)
        if bad:
            raise UltracurateError(f"unknown threshold '{bad[0]}' (one of {', '.join(sorted(known))})")
        values = {k: v for k, v in values.items() if v is not None}
        modes = dict(self.modes)
        for m in ([mode] if mode else MODES):
            if m not in modes:
                raise UltracurateError(f"unknown mode '{m}' (free or region)")
            changes = dict(values, **{k: None for k in unset})
            modes[m] = dataclasses.replace(modes[m], **changes)
        out = Thresholds(modes, self.preset_name if not (values or unset) else
                         f"{self.preset_name}+overrides")
        out.validate()
        return out

    def validate(self) -> None:
        """Raise UltracurateError for a bound that is not a finite number, a bound no score
        can meet, or min above max."""
        for mode, t in self.modes.items():
            for col, (lo, hi) in SCORE_RANGES.items():
                vmin = getattr(t, f"{col}_min", None)
                vmax = getattr(t, f"{col}_max", None)
                for bound, v in (("min", vmin), ("max", vmax)):
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                          or not math.isfinite(v)):
                        raise UltracurateError(f"threshold {col}_{bound} must be a finite "
                                               f"number, got {v!r}")
                if vmin is not None and vmin > hi:
                    raise UltracurateError(
                        f"threshold {col} >= {vmin:g} can never hold ({col} is in "
                        f"[{lo:g}, {hi:g}]); no row would pass")
                if vmax is not None and vmax < lo:
                    raise UltracurateError(
                        f"threshold {col} <= {vmax:g} can never hold ({col} is in "
                        f"[{lo:g}, {hi:g}]); no row would pass")
                if vmin is not None and vmax is not None and vmin > vmax:
                    raise UltracurateError(f"thresholds for {col} contradict each other "
                                           f"({mode}: min {vmin:g} > max {vmax:g})")
            if t.top_k is not None and (not isinstance(t.top_k, int) or t.top_k < 1):
                raise UltracurateError(f"top-k must be at least 1 ({mode}: {t.top_k})")

    def to_dict(self) -> dict:
        return {"preset": self.preset_name,
                **{m: dataclasses.asdict(t) for m, t in self.modes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        return cls({m: ModeThresholds(**d[m]) for m in MODES if m in d},
                   d.get("preset", "custom"))


def parse_judge_min(items: list[str] | None) -> dict[str, float]:
    """`--judge-min instruction=4` (repeatable) as override() keywords
    ({'judge_instruction_min': 4.0})."""
    out: dict[str, float] = {}
    for item in items or []:
        aspect, sep, value = str(item).partition("=")
        aspect = aspect.strip()
        if not sep or aspect not in JUDGE_ASPECTS:
            raise UltracurateError(f"--judge-min expects ASPECT=VALUE with ASPECT one of "
                                   f"{', '.join(JUDGE_ASPECTS)}, got '{item}'")
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise UltracurateError(f"--judge-min {aspect}: '{value}' is not a number")
        out[f"judge_{aspect}_min"] = v
    return out


_COMMON = dict(clip_sim_dir_min=0.22, clip_sim_source_min=0.2, clip_sim_target_min=0.2,
               dinov2_sim_min=0.4)

PRESETS: dict[str, dict[str, ModeThresholds]] = {
    # UltraEdit's released code (the method's defaults)
    "ultraedit": {
        "free": ModeThresholds(clip_sim_image_min=0.75, top_k=4, candidates=30, **_COMMON),
        "region": ModeThresholds(clip_sim_image_min=0.70, top_k=3, drop_if_fewer=True,
                                 candidates=100, **_COMMON),
    },
    # InstructPix2Pix's filter: 100 candidates, keep 4, CLIP 0.2 / 0.2 / 0.7 (no DINO)
    "ip2p": {
        "free": ModeThresholds(clip_sim_image_min=0.70, clip_sim_source_min=0.2,
                               clip_sim_target_min=0.2, clip_sim_dir_min=0.2, top_k=4,
                               candidates=100),
        "region": ModeThresholds(clip_sim_image_min=0.70, clip_sim_source_min=0.2,
                                 clip_sim_target_min=0.2, clip_sim_dir_min=0.2, top_k=4,
                                 candidates=100),
    },
}
