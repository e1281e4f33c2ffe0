"""Benchmark metrics: each one equals a direct computation of its reference definition
(MagicBrush's image_eval.py, Emu Edit's metrics), written here with torch / torchvision /
open_clip / transformers, on the same images with the same tiny weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ultracurate.errors import UltracurateError
from ultracurate.evaluate import evaluate

TOL = 1e-5


@pytest.fixture(scope="module")
def models(tiny_dir):
    from ultracurate.models import dino, make_tiny
    clip_ref = make_tiny(tiny_dir, ("clip",))["clip"]
    dino_ref = tiny_dir / "dino-vit"
    if not (dino_ref / "config.json").exists():
        torch.manual_seed(0)
        dino.make_tiny(dino_ref, family="vit")
    return clip_ref, str(dino_ref)


@pytest.fixture(scope="module")
def photos(demo_photos):
    folder = Path(demo_photos).parent
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.*"))
            if p.suffix in (".jpg", ".png")][:6]


# -- independent reference implementations ----------------------------------------------------
class RefClip:
    """The tiny CLIP rebuilt from its config and safetensors weights, with CLIP's preprocessing
    written out as torchvision transforms (what clip.load returns for ViT-B/32)."""

    def __init__(self, ref):
        import open_clip
        from safetensors.torch import load_file
        cfg = json.loads((Path(ref) / "open_clip_config.json").read_text())
        self.model = open_clip.CLIP(**cfg["model_cfg"]).eval()
        self.model.load_state_dict(load_file(str(Path(ref) / "open_clip_model.safetensors")))
        size = cfg["model_cfg"]["vision_cfg"]["image_size"]
        pp = cfg["preprocess_cfg"]
        self.transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size), transforms.ToTensor(),
            transforms.Normalize(pp["mean"], pp["std"])])
        self.tokenizer = open_clip.SimpleTokenizer(context_length=77)

    @torch.no_grad()
    def image(self, im):
        return self.model.encode_image(self.transform(im).unsqueeze(0)).float()[0]

    @torch.no_grad()
    def text(self, s):
        return self.model.encode_text(self.tokenizer([s])).float()[0]


class RefDino:
    def __init__(self, ref):
        from transformers import ViTModel
        self.model = ViTModel.from_pretrained(ref, add_pooling_layer=False).eval()
        self.transform = transforms.Compose([
            transforms.Resize(256, interpolation=3), transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    @torch.no_grad()
    def image(self, im):
        return self.model(self.transform(im).unsqueeze(0)).last_hidden_state[0, 0].float()


def cos(a, b) -> float:
    a, b = a.double().numpy(), b.double().numpy()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def distance(gen, gt, metric):
    gen = transforms.ToTensor()(gen.resize(gt.size))
    gt = transforms.ToTensor()(gt)
    crit = torch.nn.L1Loss() if metric == "l1" else torch.nn.MSELoss()
    return crit(gen, gt).item()


# -- MagicBrush ------------------------------------------------------------------------------
def _magicbrush_layout(tmp_path, photos):
    """Two sessions: 'a' with two turns (first, inde_2, iter_2), 'b' with one."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    caps = {}
    spec = {"a": 2, "b": 1}
    k = 0
    for sid, turns in spec.items():
        (pred / sid).mkdir(parents=True)
        (ref / sid).mkdir(parents=True)
        caps[sid] = {}
        photos[k].resize((96, 64)).save(ref / sid / f"{sid}-input.png")
        for t in range(1, turns + 1):
            gt = photos[(k + t) % len(photos)].resize((96, 64))
            gt.save(ref / sid / f"{sid}-output{t}.png")
            Image.new("L", (96, 64), 255).save(ref / sid / f"{sid}-mask{t}.png")
            caps[sid][f"{sid}-output{t}.png"] = f"caption {sid} turn {t}"
        gen_first = photos[(k + 2) % len(photos)].resize((80, 60))
        gen_first.save(pred / sid / f"{sid}_1.png")
        for t in range(2, turns + 1):
            photos[(k + 3) % len(photos)].resize((70, 50)).save(pred / sid / f"inde_{t}.png")
            photos[(k + 4) % len(photos)].resize((90, 90)).save(pred / sid / f"iter_{t}.png")
        k += 1
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    return pred, ref, caps


def test_magicbrush_metrics_match_reference(tmp_path, photos, models):
    clip_ref, dino_ref = models
    pred, ref, caps = _magicbrush_layout(tmp_path, photos)
    res = evaluate("magicbrush", pred, ref, captions=tmp_path / "captions.json", clip=clip_ref,
                   dino=dino_ref, batch_size=2, progress=False)
    rclip, rdino = RefClip(clip_ref), RefDino(dino_ref)
    o = lambda p: Image.open(p).convert("RGB")  # noqa: E731
    settings = {
        "single_turn": [(pred / "a/a_1.png", ref / "a/a-output1.png", caps["a"]["a-output1.png"]),
                        (pred / "a/inde_2.png", ref / "a/a-output2.png", caps["a"]["a-output2.png"]),
                        (pred / "b/b_1.png", ref / "b/b-output1.png", caps["b"]["b-output1.png"])],
        "multi_turn": [(pred / "a/iter_2.png", ref / "a/a-output2.png", caps["a"]["a-output2.png"]),
                       (pred / "b/b_1.png", ref / "b/b-output1.png", caps["b"]["b-output1.png"])],
    }
    assert res.counts == {"single_turn": 3, "multi_turn": 2}
    for name, pairs in settings.items():
        want = {k: 0.0 for k in ("l1", "l2", "clip_i", "dino", "clip_t", "clip_t_oracle")}
        for g, t, c in pairs:
            gen, gt = o(g), o(t)
            want["l1"] += distance(gen, gt, "l1") / len(pairs)
            want["l2"] += distance(gen, gt, "l2") / len(pairs)
            want["clip_i"] += cos(rclip.image(gen), rclip.image(gt)) / len(pairs)
            want["dino"] += cos(rdino.image(gen), rdino.image(gt)) / len(pairs)
            want["clip_t"] += cos(rclip.image(gen), rclip.text(c)) / len(pairs)
            want["clip_t_oracle"] += cos(rclip.image(gt), rclip.text(c)) / len(pairs)
        got = res.settings[name]
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=TOL), (name, k)
    # the metrics are not degenerate: different images, different scores
    per = res.per_sample["single_turn"]
    assert len({round(r["l1"], 6) for r in per}) == 3 and len({round(r["dino"], 6) for r in per}) == 3


def test_magicbrush_layout_errors(tmp_path, photos, models):
    clip_ref, dino_ref = models
    pred, ref, _ = _magicbrush_layout(tmp_path, photos)
    (pred / "a" / "inde_2.png").unlink()
    with pytest.raises(UltracurateError, match="1 single-turn images for 2 ground-truth turns"):
        evaluate("magicbrush", pred, ref, clip=clip_ref, dino=dino_ref, progress=False)
    (ref / "c").mkdir()
    with pytest.raises(UltracurateError, match="1 missing, e.g. c"):
        evaluate("magicbrush", pred, ref, clip=clip_ref, dino=dino_ref, progress=False)


# -- Emu Edit --------------------------------------------------------------------------------
def _emu_layout(tmp_path, photos):
    import datasets
    pred = tmp_path / "emu_pred"
    pred.mkdir()
    rows = {"idx": [], "image": [], "input_caption": [], "output_caption": [], "task": [],
            "instruction": []}
    for i in range(4):
        src = photos[i].resize((64 + 8 * i, 64))
        rows["idx"].append(i)
        rows["image"].append(src)
        rows["input_caption"].append(f"a photo number {i}")
        rows["output_caption"].append(f"a changed photo number {i}")
        rows["task"].append("background" if i % 2 else "style")
        rows["instruction"].append(f"change {i}")
        photos[(i + 1) % len(photos)].resize((72, 72)).save(pred / f"{i}.png")
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({
        "idx": datasets.Value("int64"), "image": datasets.Image(),
        "input_caption": datasets.Value("string"), "output_caption": datasets.Value("string"),
        "task": datasets.Value("string"), "instruction": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "emu_test.parquet"))
    return pred, tmp_path / "emu_test.parquet", rows


def test_emuedit_metrics_match_reference(tmp_path, photos, models):
    clip_ref, dino_ref = models
    pred, refs, rows = _emu_layout(tmp_path, photos)
    res = evaluate("emuedit", pred, refs, clip=clip_ref, dino=dino_ref, batch_size=3,
                   progress=False)
    rclip, rdino = RefClip(clip_ref), RefDino(dino_ref)
    n = len(rows["idx"])
    want = {k: 0.0 for k in ("clip_dir", "clip_out", "clip_img", "l1", "dino")}
    by_task: dict = {}
    for i in range(n):
        src = rows["image"][i].convert("RGB")
        edited = Image.open(pred / f"{i}.png").convert("RGB")
        unit = lambda v: v / v.norm()  # noqa: E731
        e_in, e_ed = unit(rclip.image(src)), unit(rclip.image(edited))
        t_in = unit(rclip.text(rows["input_caption"][i]))
        t_out = unit(rclip.text(rows["output_caption"][i]))
        vals = {"clip_dir": cos(e_ed - e_in, t_out - t_in), "clip_out": cos(e_ed, t_out),
                "clip_img": cos(e_in, e_ed), "l1": distance(edited, src, "l1"),
                "dino": cos(rdino.image(src), rdino.image(edited))}
        for k, v in vals.items():
            want[k] += v / n
            by_task.setdefault(rows["task"][i], {}).setdefault(k, []).append(v)
    for k, v in want.items():
        assert res.settings["all"][k] == pytest.approx(v, abs=TOL), k
    for task, vals in by_task.items():
        for k, v in vals.items():
            assert res.settings[f"task:{task}"][k] == pytest.approx(np.mean(v), abs=TOL)
    assert res.counts["all"] == 4


def test_emuedit_missing_prediction(tmp_path, photos, models):
    clip_ref, dino_ref = models
    pred, refs, _ = _emu_layout(tmp_path, photos)
    (pred / "2.png").unlink()
    with pytest.raises(UltracurateError, match="no prediction for 1 of 4 .*idx 2"):
        evaluate("emuedit", pred, refs, clip=clip_ref, dino=dino_ref, progress=False)


def test_cli_eval_writes_json_and_prints_table(tmp_path, photos, models):
    from typer.testing import CliRunner
    from ultracurate.cli import app
    clip_ref, dino_ref = models
    pred, ref, _ = _magicbrush_layout(tmp_path, photos)
    out = tmp_path / "res.json"
    r = CliRunner().invoke(app, ["eval", "--benchmark", "magicbrush", "--predictions", str(pred),
                                 "--references", str(ref), "--captions",
                                 str(tmp_path / "captions.json"), "--clip", clip_ref, "--dino",
                                 dino_ref, "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "single_turn" in r.output and "clip_t" in r.output
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"single_turn", "multi_turn"}
    assert len(data["per_sample"]["single_turn"]) == 3
    assert 0 <= data["metrics"]["multi_turn"]["l1"] <= 1
