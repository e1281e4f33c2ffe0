"""Read an export back the way each format's trainer reads it, into one shape for the tests:
{split: [row]} with the export's column names, image columns as encoded bytes (or None).

  hf     datasets.load_dataset(OUT) (images cast to undecoded bytes)
  jsonl  datasets.load_dataset(OUT) (image columns are paths relative to OUT)
  wds    webdataset.WebDataset over OUT/<split>-*.tar
  ip2p   InstructPix2Pix's EditDataset layout: seeds.json -> <name>/prompt.json and
         <name>/<seed>_0.jpg, <seed>_1.jpg (plus <seed>.json and masks beside them)
"""

from __future__ import annotations

import json
from pathlib import Path

IMAGES = ("source_image", "edited_image", "mask_image", "soft_mask_image")


def read_hf(out: Path, config: str | None = None) -> dict[str, list[dict]]:
    import datasets
    dd = datasets.load_dataset(str(out), config) if config else datasets.load_dataset(str(out))
    result = {}
    for split, ds in dd.items():
        for c in IMAGES:
            if c in ds.column_names and isinstance(ds.features[c], datasets.Image):
                ds = ds.cast_column(c, datasets.Image(decode=False))
        rows = []
        for r in ds:
            rows.append({k: (v["bytes"] if k in IMAGES and isinstance(v, dict) else v)
                         for k, v in r.items()})
        result[split] = rows
    return result


def read_jsonl(out: Path) -> dict[str, list[dict]]:
    import datasets
    dd = datasets.load_dataset(str(out))
    return {split: [{k: ((out / v).read_bytes() if k in IMAGES and v else v)
                     for k, v in r.items()} for r in ds] for split, ds in dd.items()}


def read_wds(out: Path) -> dict[str, list[dict]]:
    import webdataset as wds
    splits = sorted({p.name.split("-")[0] for p in out.glob("*.tar")})
    result = {}
    for split in splits:
        shards = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
        rows = []
        for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
            row = json.loads(sample["json"])
            for c in IMAGES:
                key = next((k for k in sample if k.split(".")[0] == c), None)
                row[c] = sample[key] if key else None
            row["_key"] = sample["__key__"]
            rows.append(row)
        result[split] = rows
    return result


def _ip2p_tree(root: Path) -> list[dict]:
    rows = []
    for name, seeds in json.loads((root / "seeds.json").read_text()):
        prompt = json.loads((root / name / "prompt.json").read_text())
        for seed in seeds:
            row = json.loads((root / name / f"{seed}.json").read_text())
            row["_prompt"] = prompt
            row["source_image"] = (root / name / f"{seed}_0.jpg").read_bytes()
            row["edited_image"] = (root / name / f"{seed}_1.jpg").read_bytes()
            for c in ("mask_image", "soft_mask_image"):
                if row.get(c):
                    row[c] = (root / name / row[c]).read_bytes()
            rows.append(row)
    return rows


def read_ip2p(out: Path) -> dict[str, list[dict]]:
    if (out / "seeds.json").exists():
        return {"train": _ip2p_tree(out)}
    return {split: _ip2p_tree(out / split) for split in ("train", "validation")
            if (out / split / "seeds.json").exists()}


READERS = {"hf": read_hf, "jsonl": read_jsonl, "wds": read_wds, "ip2p": read_ip2p}


def read_export(out: Path, fmt: str) -> dict[str, list[dict]]:
    return READERS[fmt](Path(out))


def by_idx(splits: dict[str, list[dict]]) -> dict[int, dict]:
    return {r["idx"]: r for rows in splits.values() for r in rows}
