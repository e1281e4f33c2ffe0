"""Evaluate an editing model's outputs the way papers report them: MagicBrush and Emu Edit.

MagicBrush (OSU-NLP-Group/MagicBrush, evaluation/image_eval.py), generated vs ground truth:
  l1, l2      mean |a - b| and mean (a - b)^2 on [0, 1] RGB tensors, after resizing the generated
              image to the ground truth's size with PIL's default resampling
  clip_i      cosine of CLIP ViT-B/32 image embeddings (CLIP's own preprocessing: short side to
              the input size bicubic, centre crop, CLIP mean/std)
  dino        cosine of DINO ViT-S/16 [CLS] embeddings (short side to 256 bicubic, centre crop
              224, ImageNet mean/std)
  clip_t      cosine of the generated image's and the ground-truth caption's CLIP embeddings
              (clip_t_oracle: the same with the ground-truth image)
  Two settings: single_turn (every turn edited from its ground-truth input: the first-turn
  image and the `inde_<i>` images against every `output<i>`) and multi_turn (the `iter_<n>`
  image, edited from the model's own previous outputs, against the last `output<n>`).
  Layout: PRED/<id>/<id>_1.png, <id>_inde_<i>.png, <id>_iter_<i>.png (MagicBrush's README; the
  `<id>_` before inde_/iter_ may be left out); REF/<id>/<...>output<i>.png; captions JSON
  {<id>: {<gt file name>: caption}} (MagicBrush's global_descriptions.json).

Emu Edit (facebook/emu_edit_test_set), the edited image vs the input image:
  clip_dir    cosine of (E_img(edited) - E_img(input)) and (E_txt(output_caption) -
              E_txt(input_caption)), unit-norm embeddings
  clip_out    cosine of E_img(edited) and E_txt(output_caption)
  clip_img    cosine of E_img(input) and E_img(edited)
  l1          as MagicBrush's, edited resized to the input's size
  dino        as MagicBrush's
  Layout: PRED/<idx>.<png|jpg|...>; references: the test set as a saved dataset, a hub snapshot
  folder, or a parquet / jsonl table with idx, image, input_caption, output_caption (and task).

CLIP and DINO load through `ultracurate.models.clip.load` / `ultracurate.models.dino.load`
(defaults: the real checkpoints; tests pass tiny ones by path), in float32 on every device.
Captions longer than CLIP's 77-token context are truncated (end token kept; the reference
tokenizer raises instead) and counted in `EvalResult.truncated_captions`.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .errors import UltracurateError

BENCHMARKS = ("magicbrush", "emuedit")
DEFAULT_CLIP = "ViT-B-32:openai"
DEFAULT_DINO = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# MagicBrush's DINO runs in float32; so does every metric model here, on CUDA too (where
# ultracurate's models default to float16), so that a score does not depend on the device.
EVAL_DTYPE = "float32"
METRIC_ORDER = {"magicbrush": ("l1", "l2", "clip_i", "dino", "clip_t", "clip_t_oracle"),
                "emuedit": ("clip_dir", "clip_img", "clip_out", "l1", "dino")}


@dataclass
class Pair:
    """One comparison: an image the model made and what it is measured against."""
    id: str
    generated: Any                 # path or PIL image
    reference: Any                 # MagicBrush: the ground truth; Emu Edit: the input image
    caption: str | None = None     # MagicBrush: ground-truth caption; Emu Edit: output caption
    input_caption: str | None = None
    group: str | None = None       # Emu Edit task


@dataclass
class EvalResult:
    benchmark: str
    settings: dict[str, dict[str, float]]    # setting -> metric -> mean
    counts: dict[str, int]
    models: dict[str, str]
    per_sample: dict[str, list[dict]] = field(default_factory=dict)
    # setting -> how many captions were longer than CLIP's 77 tokens (scored truncated)
    truncated_captions: dict[str, int] = field(default_factory=dict)

    def to_json(self, per_sample: bool = True) -> dict:
        out = {"benchmark": self.benchmark, "metrics": self.settings, "counts": self.counts,
               "truncated_captions": self.truncated_captions, "models": self.models}
        if per_sample:
            out["per_sample"] = self.per_sample
        return out


# -- image helpers ---------------------------------------------------------------------------
def _open(src: Any) -> Image.Image:
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, (bytes, bytearray)):
        return Image.open(io.BytesIO(src)).convert("RGB")
    if isinstance(src, dict):
        if src.get("bytes"):
            return _open(src["bytes"])
        src = src.get("path")
    try:
        with Image.open(src) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UltracurateError(f"{src}: image file not found") from None
    except Exception as e:
        raise UltracurateError(f"{src}: not a readable image ({str(e).splitlines()[0]})") from None


def pixel_distances(generated: Image.Image, reference: Image.Image) -> tuple[float, float]:
    """(L1, L2) on [0, 1] float32 tensors after resizing generated to reference's size with
    PIL's default resampling (MagicBrush's eval_distance)."""
    import torch
    gen = generated.resize(reference.size)
    a = torch.from_numpy(np.asarray(gen, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    b = torch.from_numpy(np.asarray(reference, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    d = a - b
    return float(d.abs().mean()), float((d * d).mean())


class Encoders:
    """CLIP and DINO encoders with a per-image cache (ground truths recur across settings)."""

    def __init__(self, clip_ref: str = DEFAULT_CLIP, dino_ref: str = DEFAULT_DINO,
                 device: str = "cpu", batch_size: int = 32, need_dino: bool = True):
        from .models import clip as clip_mod
        from .models import dino as dino_mod
        self.clip = clip_mod.load(clip_ref, device, dtype=EVAL_DTYPE)
        self.dino = None
        if need_dino:
            # MagicBrush's DINO transform: Resize(256, bicubic), CenterCrop(224), ImageNet
            # normalisation, whatever the checkpoint's own processor says.
            self.dino = dino_mod.load(dino_ref, device, dtype=EVAL_DTYPE, resize=256, crop=224)
            self.dino.mean, self.dino.std = IMAGENET_MEAN, IMAGENET_STD
        self.batch_size = batch_size
        self.models = {"clip": str(clip_ref), "dino": str(dino_ref) if need_dino else ""}
        self._cache: dict[tuple[str, Any], Any] = {}

    def images(self, which: str, keys: Sequence[Any], loader: Callable[[Any], Image.Image]):
        """Unit-norm embeddings (N, D) of the images behind keys, batched, cached by key."""
        import torch
        model = self.clip if which == "clip" else self.dino
        todo = [k for k in dict.fromkeys(keys) if (which, _key(k)) not in self._cache]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            emb = model.encode_pixels([model.pixels(loader(k)) for k in chunk])
            for k, e in zip(chunk, emb):
                self._cache[(which, _key(k))] = e
        return torch.stack([self._cache[(which, _key(k))] for k in keys]) if keys else None

    def texts(self, texts: Sequence[str]):
        """Unit-norm CLIP text embeddings (N, D); texts over 77 tokens are truncated."""
        import torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            out.append(self.clip.encode_texts(list(texts[i:i + self.batch_size])))
        return torch.cat(out) if out else None


def _key(k: Any) -> Any:
    return k if isinstance(k, (str, Path, int)) else id(k)


def _cos(a, b) -> list[float]:
    import torch
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).tolist()


# -- MagicBrush ------------------------------------------------------------------------------
# A prediction's name: `<id>_1` (the first turn), `[<id>_]inde_<i>` (turn i edited from the
# ground-truth input), `[<id>_]iter_<i>` (turn i edited from the model's own previous output).
# The reference script matches these by substring; names are parsed whole here, so that
# `139_inde_10` is turn 10 of the independent setting and never also "a `_1` image".
_PRED_NAME = re.compile(r"^(?:.*_)?(?P<kind>inde|iter)_(?P<turn>\d+)$")


def _turn(name: str) -> int:
    m = re.search(r"(\d+)$", Path(name).stem)
    return int(m.group(1)) if m else -1


def _images_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTS and "mask" not in p.name)


@dataclass
class _Predictions:
    """One session's prediction files, by role."""
    first: list[str]
    inde: dict[int, str]
    iter: dict[int, str]


def _read_predictions(gen_dir: Path) -> _Predictions:
    first, found = [], {"inde": {}, "iter": {}}
    for n in _images_in(gen_dir):
        stem = Path(n).stem
        m = _PRED_NAME.match(stem)
        if m:
            turns = found[m["kind"]]
            t = int(m["turn"])
            if t in turns:
                raise UltracurateError(f"{gen_dir}: two {m['kind']}_ images for turn {t} "
                                       f"({turns[t]}, {n})")
            turns[t] = n
        elif stem.endswith("_1"):
            first.append(n)
    return _Predictions(first, found["inde"], found["iter"])


def _session_pairs(img_id: str, gen_dir: Path, gt_dir: Path
                   ) -> tuple[list[tuple[Path, Path]], tuple[Path, Path]]:
    """(single-turn pairs in turn order, the multi-turn pair) of one session."""
    gts = sorted((n for n in _images_in(gt_dir) if "output" in n), key=_turn)
    if not gts:
        raise UltracurateError(f"{gt_dir}: no output<i> ground-truth image")
    n = len(gts)
    pred = _read_predictions(gen_dir)
    if len(pred.first) != 1:
        raise UltracurateError(f"{gen_dir}: expected one first-turn image named "
                               f"{img_id}_1.png, found {len(pred.first)}")
    if len(pred.inde) + 1 != n:
        raise UltracurateError(f"{gen_dir}: {len(pred.inde) + 1} single-turn images for "
                               f"{n} ground-truth turns")
    if set(pred.inde) != set(range(2, n + 1)):
        raise UltracurateError(f"{gen_dir}: inde_ images are turns "
                               f"{', '.join(map(str, sorted(pred.inde)))}; the ground truth has "
                               f"turns 2..{n}")
    beyond = sorted(t for t in pred.iter if not 2 <= t <= n)
    if beyond:
        raise UltracurateError(f"{gen_dir}: iter_{beyond[0]} is not a turn of session {img_id} "
                               f"(iter_ images are turns 2..{n})" if n > 1 else
                               f"{gen_dir}: session {img_id} has one turn but an iter_ image "
                               f"({pred.iter[beyond[0]]})")
    if n > 1 and n not in pred.iter:
        # The reference raises when a session has no iter_ image (else it would score the
        # first turn against the last ground truth); an earlier iter_ is no better.
        have = f"has {', '.join(pred.iter[t] for t in sorted(pred.iter))}" if pred.iter \
            else "has no iter_ image"
        raise UltracurateError(f"{gen_dir}: session {img_id} has {n} turns but {have}; its "
                               f"multi-turn image is {img_id}_iter_{n}.png")
    turns = [pred.first[0]] + [pred.inde[t] for t in range(2, n + 1)]
    single = [(gen_dir / g, gt_dir / t) for g, t in zip(turns, gts)]
    final = pred.iter[n] if n > 1 else pred.first[0]
    return single, (gen_dir / final, gt_dir / gts[-1])


def magicbrush_pairs(predictions: str | Path, references: str | Path,
                     captions: dict | None = None) -> dict[str, list[Pair]]:
    """single_turn and multi_turn pairs from MagicBrush's folder layout (see the module
    docstring). Raises UltracurateError naming the first folder that does not match."""
    pred, ref = Path(predictions), Path(references)
    for p in (pred, ref):
        if not p.is_dir():
            raise UltracurateError(f"{p}: not a folder")
    pred_ids = sorted(d.name for d in pred.iterdir() if d.is_dir())
    ref_ids = sorted(d.name for d in ref.iterdir() if d.is_dir())
    if set(pred_ids) != set(ref_ids):
        missing = sorted(set(ref_ids) - set(pred_ids))
        extra = sorted(set(pred_ids) - set(ref_ids))
        raise UltracurateError(
            f"predictions and references hold different ids ({len(missing)} missing"
            + (f", e.g. {missing[0]}" if missing else "") + f", {len(extra)} extra"
            + (f", e.g. {extra[0]}" if extra else "") + ")")

    def cap(img_id, gt: Path):
        if captions is None:
            return None
        try:
            return captions[img_id][gt.name]
        except (KeyError, TypeError):
            raise UltracurateError(f"captions have no entry for {img_id}/{gt.name}") from None

    single, multi = [], []
    for img_id in ref_ids:
        turns, (g, t) = _session_pairs(img_id, pred / img_id, ref / img_id)
        for i, (gi, ti) in enumerate(turns, 1):
            single.append(Pair(f"{img_id}/{i}", gi, ti, cap(img_id, ti)))
        multi.append(Pair(img_id, g, t, cap(img_id, t)))
    return {"single_turn": single, "multi_turn": multi}


def score_magicbrush(pairs: list[Pair], enc: Encoders, progress: Callable[[int], None] = None
                     ) -> tuple[dict[str, float], list[dict]]:
    gen_keys = [str(p.generated) for p in pairs]
    ref_keys = [str(p.reference) for p in pairs]
    rows = []
    for p in pairs:
        l1, l2 = pixel_distances(_open(p.generated), _open(p.reference))
        rows.append({"id": p.id, "l1": l1, "l2": l2})
        if progress:
            progress(1)
    g, r = enc.images("clip", gen_keys, _open), enc.images("clip", ref_keys, _open)
    for row, v in zip(rows, _cos(g, r)):
        row["clip_i"] = v
    if enc.dino is not None:
        gd, rd = enc.images("dino", gen_keys, _open), enc.images("dino", ref_keys, _open)
        for row, v in zip(rows, _cos(gd, rd)):
            row["dino"] = v
    if all(p.caption is not None for p in pairs):
        captions = [p.caption for p in pairs]
        t = enc.texts(captions)
        for row, v, o, cut in zip(rows, _cos(g, t), _cos(r, t), enc.clip.truncated(captions)):
            row["clip_t"], row["clip_t_oracle"] = v, o
            row["truncated_captions"] = int(cut)
    return _means(rows), rows


# -- Emu Edit --------------------------------------------------------------------------------
def _load_references(references: str | Path, split: str):
    import datasets
    ref = Path(references)
    if not ref.exists():
        raise UltracurateError(f"{ref}: no such file or folder")
    try:
        if ref.is_dir() and ((ref / "dataset_info.json").exists() or (ref / "state.json").exists()
                             or (ref / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(ref))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UltracurateError(f"{ref}: no split '{split}' (has {', '.join(ds)})")
                ds = ds[split]
        elif ref.is_dir():
            ds = datasets.load_dataset(str(ref), split=split)
        else:
            kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json",
                    ".csv": "csv"}.get(ref.suffix)
            if kind is None:
                raise UltracurateError(f"{ref}: references must be a dataset folder or a "
                                       "parquet / jsonl / csv table")
            ds = datasets.load_dataset(kind, data_files=str(ref), split="train")
    except UltracurateError:
        raise
    except Exception as e:
        raise UltracurateError(f"{ref}: cannot read references ({str(e).splitlines()[0]})") \
            from None
    need = {"idx", "image", "input_caption", "output_caption"}
    if not need <= set(ds.column_names):
        raise UltracurateError(f"{ref}: references lack columns "
                               f"{', '.join(sorted(need - set(ds.column_names)))}")
    if isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return ds, (ref.parent if ref.is_file() else ref)


def emuedit_pairs(predictions: str | Path, references: str | Path, split: str = "test"
                  ) -> list[Pair]:
    """One pair per reference row: PRED/<idx>.<ext> against the row's input image."""
    pred = Path(predictions)
    if not pred.is_dir():
        raise UltracurateError(f"{pred}: not a folder")
    by_stem = {p.stem: p for p in pred.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    ds, base = _load_references(references, split)
    pairs, missing = [], []
    for row in ds:
        idx = str(row["idx"])
        if idx not in by_stem:
            missing.append(idx)
            continue
        image = row["image"]
        if isinstance(image, str):
            image = image if Path(image).is_absolute() else str(base / image)
        pairs.append(Pair(idx, by_stem[idx], image, row["output_caption"],
                          row["input_caption"], row.get("task")))
    if missing:
        raise UltracurateError(f"{pred}: no prediction for {len(missing)} of {len(ds)} "
                               f"reference rows (e.g. idx {missing[0]}: {missing[0]}.png)")
    return pairs


def score_emuedit(pairs: list[Pair], enc: Encoders, progress: Callable[[int], None] = None
                  ) -> tuple[dict[str, float], list[dict]]:
    inputs = {p.id: p.reference for p in pairs}
    gen_keys = [str(p.generated) for p in pairs]
    in_keys = [f"input:{p.id}" for p in pairs]

    def load_input(k: str) -> Image.Image:
        return _open(inputs[k[len("input:"):]])

    rows = []
    for p in pairs:
        l1, _ = pixel_distances(_open(p.generated), _open(p.reference))
        rows.append({"id": p.id, "task": p.group, "l1": l1})
        if progress:
            progress(1)
    e, i = enc.images("clip", gen_keys, _open), enc.images("clip", in_keys, load_input)
    t_out = enc.texts([p.caption for p in pairs])
    t_in = enc.texts([p.input_caption for p in pairs])
    cut_out = enc.clip.truncated([p.caption for p in pairs])
    cut_in = enc.clip.truncated([p.input_caption for p in pairs])
    for row, d, o, im, c_out, c_in in zip(rows, _cos(e - i, t_out - t_in), _cos(e, t_out),
                                          _cos(i, e), cut_out, cut_in):
        row["clip_dir"], row["clip_out"], row["clip_img"] = d, o, im
        row["truncated_captions"] = int(c_out) + int(c_in)
    if enc.dino is not None:
        ed, idn = enc.images("dino", gen_keys, _open), enc.images("dino", in_keys, load_input)
        for row, v in zip(rows, _cos(idn, ed)):
            row["dino"] = v
    return _means(rows), rows


_METRICS = {m for names in METRIC_ORDER.values() for m in names}


def _means(rows: list[dict]) -> dict[str, float]:
    keys = [k for k in rows[0] if k in _METRICS] if rows else []
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def _truncated(rows: list[dict]) -> int | None:
    """How many of rows' captions were truncated; None when no caption was scored."""
    if not rows or "truncated_captions" not in rows[0]:
        return None
    return sum(r["truncated_captions"] for r in rows)


# -- the public entry point ------------------------------------------------------------------
def evaluate(benchmark: str, predictions: str | Path, references: str | Path, *,
             captions: str | Path | dict | None = None, clip: str = DEFAULT_CLIP,
             dino: str = DEFAULT_DINO, metrics: Sequence[str] | None = None,
             split: str = "test", device: str = "cpu", batch_size: int = 32,
             progress: bool = True) -> EvalResult:
    """Score predictions against a benchmark's references (see the module docstring).
    metrics limits the work (e.g. ("l1", "l2") needs no model but CLIP)."""
    if benchmark not in BENCHMARKS:
        raise UltracurateError(f"unknown benchmark '{benchmark}' ({' or '.join(BENCHMARKS)})")
    if isinstance(captions, (str, Path)):
        try:
            captions = json.loads(Path(captions).read_text())
        except FileNotFoundError:
            raise UltracurateError(f"{captions}: captions file not found") from None
        except json.JSONDecodeError as e:
            raise UltracurateError(f"{captions}: not JSON ({e})") from None
    if benchmark == "magicbrush":
        settings = magicbrush_pairs(predictions, references, captions)
    else:
        settings = {"all": emuedit_pairs(predictions, references, split)}
    need_dino = metrics is None or "dino" in metrics
    enc = Encoders(clip, dino, device, batch_size, need_dino=need_dino)
    total = sum(len(p) for p in settings.values())
    from .export import _bar
    scored, per_sample, counts, truncated = {}, {}, {}, {}
    with _bar(total, f"eval {benchmark}", progress) as advance:
        for name, pairs in settings.items():
            if not pairs:
                raise UltracurateError(f"{benchmark}: no pairs to evaluate in {name}")
            fn = score_magicbrush if benchmark == "magicbrush" else score_emuedit
            means, rows = fn(pairs, enc, advance)
            groups = {name: rows}
            if benchmark == "emuedit" and any(r["task"] for r in rows):
                for task in sorted({r["task"] for r in rows if r["task"]}):
                    groups[f"task:{task}"] = [r for r in rows if r["task"] == task]
            per_sample[name] = rows
            for group, sub in groups.items():
                scored[group] = means if group == name else _means(sub)
                counts[group] = len(sub)
                if _truncated(sub) is not None:
                    truncated[group] = _truncated(sub)
    if metrics:
        scored = {s: {k: v for k, v in m.items() if k in metrics or
                      (k == "clip_t_oracle" and "clip_t" in metrics)}
                  for s, m in scored.items()}
    return EvalResult(benchmark, scored, counts, enc.models, per_sample, truncated)


def render_table(result: EvalResult) -> None:
    """Print a rich table: one row per setting, one column per metric."""
    from rich.console import Console
    from rich.table import Table
    order = [m for m in METRIC_ORDER[result.benchmark]
             if any(m in v for v in result.settings.values())]
    t = Table(title=f"{result.benchmark} ({', '.join(f'{k} {v}' for k, v in result.models.items() if v)})")
    t.add_column("setting")
    t.add_column("n", justify="right")
    for m in order:
        t.add_column(m, justify="right")
    for setting, vals in result.settings.items():
        t.add_row(setting, str(result.counts.get(setting, "")),
                  *[f"{vals[m]:.4f}" if m in vals else "" for m in order])
    console = Console()
    console.print(t)
    if result.truncated_captions:
        # the reference scripts' tokenizer refuses such captions; say how many were cut
        console.print("captions over CLIP's 77 tokens, scored truncated: " + ", ".join(
            f"{k} {v}" for k, v in result.truncated_captions.items()))
