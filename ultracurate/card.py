"""The dataset card of an export: README.md built with huggingface_hub's DatasetCard and
DatasetCardData, features and splits through `datasets`' DatasetInfosDict.

What it says comes from the catalog: the runs that produced the exported rows (their options,
models and code versions; a tiny random-weight model is named as such), the selection, counts
per split and edit type. No local path of this machine appears in it (`export.public`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .export import (RUN_COLUMNS, SOFT_MASK_COLUMN, VALIDATION, ExportOptions,
                     edit_type_counts, public)
from .selection import Selection

# UltraEdit's paper: the method this data follows (the card's default citation).
ULTRAEDIT_CITATION = """@article{zhao2024ultraedit,
  title   = {UltraEdit: Instruction-based Fine-Grained Image Editing at Scale},
  author  = {Zhao, Haozhe and Ma, Xiaojian and Chen, Liang and Si, Shuzheng and Wu, Rujie and
             An, Kaikai and Yu, Peiyu and Zhang, Minjia and Li, Qing and Chang, Baobao},
  journal = {arXiv preprint arXiv:2407.05282},
  year    = {2024}
}"""


def run_provenance(cat: Catalog, rows: list[dict], selection: Selection) -> dict:
    """The runs that produced the exported rows: stage, options, models and code version."""
    run_ids = sorted({r[c] for r in rows for c in RUN_COLUMNS if r.get(c) is not None})
    runs = []
    if run_ids:
        runs = cat.query("SELECT run_id, stage, params, models, code_version, started_at "
                         "FROM runs WHERE run_id IN (SELECT unnest(?)) ORDER BY run_id",
                         [run_ids])
    for r in runs:
        for k in ("params", "models"):
            if isinstance(r[k], str):
                try:
                    r[k] = json.loads(r[k])
                except json.JSONDecodeError:
                    pass
    return {"selection": selection.to_json(), "runs": runs}


def _is_tiny(ref: str, profile: str | None) -> bool:
    p = Path(ref)
    try:
        if (p / ".complete").exists() and (p.parent / "manifest.json").exists():
            return True  # a folder `models.make_tiny` built
    except OSError:
        pass
    return profile == "tiny" and os.path.isabs(ref)


def describe_model(ref: Any, profile: str | None = None) -> str:
    """How the card names a model: a hub id as it is; a tiny model as what it is; a local
    checkpoint by its folder name only (no path of this machine)."""
    if not isinstance(ref, str):
        return json.dumps(public(ref), sort_keys=True)
    if _is_tiny(ref, profile):
        return "tiny random-weight model built by ultracurate (not trained)"
    if os.path.isabs(ref) or ref.startswith(("~", "./", "../")):
        return f"local checkpoint `{Path(ref).name}`"
    return f"`{ref}`"


def models_used(provenance: dict) -> list[tuple[str, str, str, list[int]]]:
    """(stage, role, model as the card names it, run ids) for every model a run recorded."""
    seen: dict[tuple[str, str, str], list[int]] = {}
    for run in provenance["runs"]:
        models = run["models"] if isinstance(run["models"], dict) else {}
        profile = models.get("profile")
        for role, ref in models.items():
            if role in ("profile", "versions"):
                continue
            if role in ("llm", "captioner", "judge") and isinstance(ref, dict):
                ref = ref.get("model") or ref.get("backend")
            key = (run["stage"], role, describe_model(ref, profile))
            seen.setdefault(key, []).append(run["run_id"])
        if run["stage"] in ("import-ultraedit", "import_ultraedit"):  # (the latter: before 008)
            key = (run["stage"], "scores", "as published in `BleachNick/UltraEdit`")
            seen.setdefault(key, []).append(run["run_id"])
    return [(s, r, m, ids) for (s, r, m), ids in seen.items()]


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


_COLUMN_MEANING = {
    "idx": "candidate id in the curating catalog",
    "source_caption": "caption of the source image",
    "target_caption": "caption of the edited image",
    "edit_prompt": "the edit instruction",
    "source_image": "source image (the generator's regeneration of the real photo, or the "
                    "photo itself: see `source_is_anchor`)",
    "edited_image": "edited image",
    "edit_object": "the edited region's phrase on region-based rows, else null",
    "mask_image": "edit region on region-based rows (L, 255 = editable), in the pair's "
                  "geometry; null on free-form rows",
    SOFT_MASK_COLUMN: "the soft mask generation blended with (L, 255 * M), in the pair's "
                      "geometry; null where none was recorded",
    "clip_sim_source": "CLIP cosine: source image vs source caption",
    "clip_sim_target": "CLIP cosine: edited image vs target caption",
    "clip_sim_dir": "CLIP directional similarity (image change vs caption change)",
    "clip_sim_image": "CLIP cosine: source vs edited image",
    "dinov2_sim": "DINOv2 cosine: source vs edited image",
    "ssim": "SSIM between source and edited image",
}


def dataset_card(dataset: dict, opts: ExportOptions, provenance: dict,
                 split_bytes: dict[str, int]) -> str:
    """README.md of one exported dataset, built with huggingface_hub's DatasetCard and
    DatasetCardData: license, language, citation, configs and `datasets`' dataset_info in the
    YAML header; counts, columns, models and the runs that made the rows in the body. No local
    path of this machine appears in it."""
    import datasets
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard, DatasetCardData

    from . import __version__
    configs = dataset["configs"]
    splits: dict[str, list[dict]] = dataset["splits"]
    total = sum(len(r) for r in splits.values())
    card_configs = []
    infos = {}
    for name, (counts, pattern) in configs.items():
        card_configs.append({"config_name": name, **({"default": True}
                                                     if name == "default" else {}),
                             "data_files": [{"split": s, "path": pattern.format(split=s)}
                                            for s in counts]})
        infos[name] = datasets.DatasetInfo(
            features=dataset["features"][name], config_name=name,
            splits=datasets.SplitDict({s: datasets.SplitInfo(
                s, num_bytes=int(split_bytes.get(s, 0)) if name == "default" else 0,
                num_examples=n) for s, n in counts.items()}))
    data = DatasetCardData(
        license=opts.license, language=list(opts.language), pretty_name=dataset["title"],
        task_categories=["image-to-image"], size_categories=[_size_category(total)],
        tags=["image-editing", "instruction-based-image-editing", "ultracurate"],
        configs=card_configs, citation=opts.citation or ULTRAEDIT_CITATION)
    DatasetInfosDict(infos).to_dataset_card_data(data)

    split_names = list(splits)
    lines = [f"# {dataset['title']}", "",
             f"Curated with ultracurate {__version__} following UltraEdit's method: real image "
             "anchors, LLM-written instructions, free-form and region-based edits, scored, "
             "filtered, balanced and de-duplicated. Columns follow UltraEdit's published schema "
             "(`BleachNick/UltraEdit`).", "",
             "```python", "from datasets import load_dataset",
             f"ds = load_dataset(\"path/or/repo\")  # splits: {', '.join(split_names)}"]
    for name in configs:
        if name != "default":
            lines.append(f"ds = load_dataset(\"path/or/repo\", \"{name}\")  # "
                         f"{name.replace('_', '-')} rows only")
    lines += ["```", ""]
    if VALIDATION in splits:
        lines += [f"The `{VALIDATION}` split is cut by anchor (seed {opts.seed}, about "
                  f"{opts.val_fraction:g} of the rows): no source photo, nor a near-duplicate "
                  "of one, is in both splits.", ""]
    lines += ["## Splits", "", "| split | rows | free-form | region-based |", "|---|---|---|---|"]
    for s, rows in splits.items():
        free = sum(r["mode"] == "free" for r in rows)
        lines.append(f"| {s} | {len(rows)} | {free} | {len(rows) - free} |")
    counts = {s: edit_type_counts(r) for s, r in splits.items()}
    types = sorted({t for c in counts.values() for t in c})
    shown = split_names if len(split_names) <= 8 else []
    lines += ["", "## Rows per edit type", "",
              "| edit type | " + " | ".join(shown + ["all"]) + " |",
              "|---|" + "---|" * (len(shown) + 1)]
    for t in types:
        lines.append(f"| {t} | " + " | ".join([str(counts[s].get(t, 0)) for s in shown]
                                            + [str(sum(c.get(t, 0) for c in counts.values()))])
                     + " |")
    lines += ["", "## Columns", "", "| column | type | meaning |", "|---|---|---|"]
    feats = dataset["features"]["default"]
    for c, f in feats.items():
        kind = "Image" if isinstance(f, datasets.Image) else f.dtype
        meaning = _COLUMN_MEANING.get(c, "catalog column (`--extra-columns`)")
        lines.append(f"| `{c}` | {kind} | {meaning} |")
    lines += ["", "The scores are those of the models under Models, whatever UltraEdit used.",
              "", "## Models", ""]
    used = models_used(provenance)
    if used:
        lines += ["| stage | role | model | runs |", "|---|---|---|---|"]
        lines += [f"| {s} | {r} | {m} | {', '.join(map(str, ids))} |" for s, r, m, ids in used]
    else:
        lines.append("No model was recorded by the runs that made these rows.")
    if any("tiny random-weight" in m for _, _, m, _ in used):
        lines += ["", "**Made with tiny random-weight models** (ultracurate's test and demo "
                  "profile): the images and scores carry no meaning; do not train on it."]
    lines += ["", "## Selection", "", "```json", json.dumps(public(provenance["selection"]),
                                                         indent=2), "```", "",
              "## How the rows were made", ""]
    if not provenance["runs"]:
        lines += ["No recorded runs (rows were inserted or imported directly).", ""]
    for run in provenance["runs"]:
        lines += [f"### {run['stage']} (run {run['run_id']}, {run['started_at']}, "
                  f"{run['code_version']})", ""]
        if run["params"]:
            lines += ["Options:", "", "```json",
                      json.dumps(public(run["params"]), indent=2, default=str), "```", ""]
        versions = (run["models"] or {}).get("versions") if isinstance(run["models"], dict) \
            else None
        if versions:
            lines += ["Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
                      ""]
    lines += ["## Citation", "", "```bibtex", opts.citation or ULTRAEDIT_CITATION, "```"]
    body = "\n".join(lines).rstrip() + "\n"
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
