"""Benchmark metrics: each one equals a direct computation of its reference definition
(MagicBrush's image_eval.py, Emu Edit's metrics), written here with torch / torchvision /
open_clip / transformers, on the same images with the same tiny weights."""

from __future__ import annotations

import json
import os
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
SESSIONS = {"139": 3, "30": 1}   # session id -> turns; numeric ids, as in MagicBrush's test set
NAMINGS = {
    # MagicBrush's README (evaluation/README.md): every name carries the session id
    "readme": {"first": "{sid}_1.png", "inde": "{sid}_inde_{t}.png", "iter": "{sid}_iter_{t}.png"},
    # the short names ultracurate's docs used before
    "short": {"first": "{sid}_1.png", "inde": "inde_{t}.png", "iter": "iter_{t}.png"},
}
LONG_CAPTION = " ".join(["cat"] * 90)   # 92 tokens: over CLIP's 77


def _magicbrush_layout(tmp_path, photos, naming="readme", long_caption_on=None):
    """Sessions as SESSIONS, predictions named as NAMINGS[naming]: the first turn, inde_<t> and
    iter_<t> for turns 2..n. Ground truth as MagicBrush's test images (<id>-input.png,
    <id>-output<t>.png, <id>-mask<t>.png). Returns pred, ref, captions and the expected pairs
    of each setting, written out from the README's definition: (generated, ground truth)."""
    names = NAMINGS[naming]
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    caps, want = {}, {"single_turn": [], "multi_turn": []}
    for k, (sid, turns) in enumerate(SESSIONS.items()):
        (pred / sid).mkdir(parents=True)
        (ref / sid).mkdir(parents=True)
        caps[sid] = {}
        photos[k].resize((96, 64)).save(ref / sid / f"{sid}-input.png")
        gen = {}
        for t in range(1, turns + 1):
            gt = photos[(k + t) % len(photos)].resize((96, 64))
            gt.save(ref / sid / f"{sid}-output{t}.png")
            Image.new("L", (96, 64), 255).save(ref / sid / f"{sid}-mask{t}.png")
            caps[sid][f"{sid}-output{t}.png"] = f"caption {sid} turn {t}"
            kinds = ("first",) if t == 1 else ("inde", "iter")
            for j, kind in enumerate(kinds):
                name = names[kind].format(sid=sid, t=t)
                photos[(k + t + 2 + j) % len(photos)].resize((70 + 10 * j, 50 + 7 * t)).save(
                    pred / sid / name)
                gen[kind, t] = name
            want["single_turn"].append((pred / sid / gen["first" if t == 1 else "inde", t],
                                        ref / sid / f"{sid}-output{t}.png"))
        final = gen["first", 1] if turns == 1 else gen["iter", turns]
        want["multi_turn"].append((pred / sid / final, ref / sid / f"{sid}-output{turns}.png"))
    if long_caption_on:
        caps[long_caption_on[0]][long_caption_on[1]] = LONG_CAPTION
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    return pred, ref, caps, want


def reference_pairs(pred: Path, ref: Path):
    """MagicBrush's evaluation/image_eval.py pairing rules, restated: names matched by substring
    ('.png'/'.jpg', not 'mask'; '_1', 'inde_', 'iter_', 'output'), sorted by the integer made of
    every digit in the name (the single-turn list: in the whole path)."""
    def digits(s):
        return int("".join(ch for ch in s if ch.isdigit()))

    def listing(d):
        return [s for s in os.listdir(d) if (".png" in s or ".jpg" in s) and "mask" not in s]

    all_turn, final_turn = [], []
    for sid in sorted(os.listdir(pred)):
        gd, td = os.path.join(pred, sid), os.path.join(ref, sid)
        gens, gts = listing(gd), [s for s in listing(td) if "output" in s]
        if len(gens) == 1:
            assert "_1" in gens[0]
            final, every = gens[0], [os.path.join(gd, gens[0])]
        else:
            iters = sorted((s for s in gens if "iter_" in s), key=digits)
            assert iters, f"{gd}: no iter_ image (the reference raises)"
            final = iters[-1]
            every = [os.path.join(gd, s) for s in gens if "_1" in s]
            every += [os.path.join(gd, s) for s in gens if "inde_" in s]
            every.sort(key=digits)
        gt_every = sorted((os.path.join(td, s) for s in gts), key=digits)
        assert len(every) == len(gt_every)
        all_turn += list(zip(every, gt_every))
        final_turn.append((os.path.join(gd, final), os.path.join(td, sorted(gts, key=digits)[-1])))
    return {"single_turn": all_turn, "multi_turn": final_turn}


def expected_magicbrush(pairs, captions, rclip, rdino):
    """Every MagicBrush metric of pairs, computed from their definitions."""
    want = {k: 0.0 for k in ("l1", "l2", "clip_i", "dino", "clip_t", "clip_t_oracle")}
    for g, t in pairs:
        gen, gt = Image.open(g).convert("RGB"), Image.open(t).convert("RGB")
        c = captions[Path(t).parent.name][Path(t).name]
        want["l1"] += distance(gen, gt, "l1") / len(pairs)
        want["l2"] += distance(gen, gt, "l2") / len(pairs)
        want["clip_i"] += cos(rclip.image(gen), rclip.image(gt)) / len(pairs)
        want["dino"] += cos(rdino.image(gen), rdino.image(gt)) / len(pairs)
        want["clip_t"] += cos(rclip.image(gen), rclip.text(c)) / len(pairs)
        want["clip_t_oracle"] += cos(rclip.image(gt), rclip.text(c)) / len(pairs)
    return want


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_magicbrush_metrics_match_reference(tmp_path, photos, models, naming):
    clip_ref, dino_ref = models
    pred, ref, caps, want_pairs = _magicbrush_layout(tmp_path, photos, naming)
    res = evaluate("magicbrush", pred, ref, captions=tmp_path / "captions.json", clip=clip_ref,
                   dino=dino_ref, batch_size=2, progress=False)
    rclip, rdino = RefClip(clip_ref), RefDino(dino_ref)
    assert res.counts == {"single_turn": 4, "multi_turn": 2}
    assert res.truncated_captions == {"single_turn": 0, "multi_turn": 0}
    for name, pairs in want_pairs.items():
        want = expected_magicbrush(pairs, caps, rclip, rdino)
        got = res.settings[name]
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=TOL), (name, k)
    # the metrics are not degenerate: different images, different scores
    per = res.per_sample["single_turn"]
    assert len({round(r["l1"], 6) for r in per}) == 4 and len({round(r["dino"], 6) for r in per}) == 4


@pytest.mark.parametrize("naming,reference_agrees", [("readme", True), ("short", False)])
def test_readme_layout_is_paired_as_the_reference_script_pairs_it(tmp_path, photos, naming,
                                                                   reference_agrees):
    """The layout docs/evaluation.md recommends (the README's) is paired identically by eval and
    by the reference's substring rules; the short names are misordered by the reference when
    session ids have digits (its sort key is every digit of the path)."""
    from ultracurate.evaluate import magicbrush_pairs
    pred, ref, _, want = _magicbrush_layout(tmp_path, photos, naming)
    ours = {k: [(str(p.generated), str(p.reference)) for p in v]
            for k, v in magicbrush_pairs(pred, ref).items()}
    assert ours == {k: [(str(g), str(t)) for g, t in v] for k, v in want.items()}
    assert (reference_pairs(pred, ref) == ours) is reference_agrees


def _unlink(pattern):
    def change(pred, ref):
        for p in pred.glob(pattern):
            p.unlink()
    return change


def _rename(src, dst):
    def change(pred, ref):
        (pred / src).rename(pred / dst)
    return change


def _copy(src, dst):
    def change(pred, ref):
        (pred / dst).write_bytes((pred / src).read_bytes())
    return change


@pytest.mark.parametrize("change,message", [
    # a multi-turn session without iter_ images: the reference raises, so does eval
    (_unlink("139/*iter_*"), r"pred/139: session 139 has 3 turns but has no iter_ image; its "
                             r"multi-turn image is 139_iter_3\.png"),
    (_unlink("139/*iter_3*"), r"session 139 has 3 turns but has 139_iter_2\.png"),
    (_unlink("139/*inde_2*"), "2 single-turn images for 3 ground-truth turns"),
    (_rename("139/139_inde_3.png", "139/139_inde_4.png"), "inde_ images are turns 2, 4"),
    (_copy("139/139_inde_2.png", "139/inde_2.png"), "two inde_ images for turn 2"),
    (_rename("139/139_1.png", "139/139_first.png"), "expected one first-turn image named "
                                                    "139_1.png, found 0"),
    (_copy("30/30_1.png", "30/30_iter_2.png"), "session 30 has one turn but an iter_ image"),
    (lambda pred, ref: (ref / "31").mkdir(), "1 missing, e.g. 31"),
])
def test_magicbrush_layout_errors(tmp_path, photos, models, change, message):
    clip_ref, dino_ref = models
    pred, ref, _, _ = _magicbrush_layout(tmp_path, photos)
    change(pred, ref)
    with pytest.raises(UltracurateError, match=message):
        evaluate("magicbrush", pred, ref, clip=clip_ref, dino=dino_ref, progress=False)


def test_cli_refuses_a_session_without_its_multi_turn_image(tmp_path, photos, models):
    from test_cli import _one_line_error, run
    clip_ref, dino_ref = models
    pred, ref, _, _ = _magicbrush_layout(tmp_path, photos)
    for p in (pred / "139").glob("*iter_*"):
        p.unlink()
    res = run("eval", "-b", "magicbrush", "--predictions", str(pred), "--references", str(ref),
              "--clip", clip_ref, "--dino", dino_ref, "--device", "cpu")
    _one_line_error(res, "session 139", "139_iter_3.png")
    assert res.returncode == 1 and not (pred / "eval_magicbrush.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_in_float32_as_the_cpu_does(tmp_path, photos, models):
    """On CUDA the metric models run in float32 (MagicBrush's DINO does): the scores are the
    CPU's, to the 1e-4 the issue allows for cuDNN's TF32 convolutions."""
    from ultracurate.evaluate import Encoders
    clip_ref, dino_ref = models
    enc = Encoders(clip_ref, dino_ref, device="cuda")
    assert {p.dtype for m in (enc.clip.model, enc.dino.model) for p in m.parameters()} == \
        {torch.float32}
    pred, ref, _, _ = _magicbrush_layout(tmp_path, photos)
    kw = dict(captions=tmp_path / "captions.json", clip=clip_ref, dino=dino_ref, progress=False)
    cpu = evaluate("magicbrush", pred, ref, device="cpu", **kw)
    gpu = evaluate("magicbrush", pred, ref, device="cuda", **kw)
    for name, vals in cpu.settings.items():
        for k, v in vals.items():
            assert gpu.settings[name][k] == pytest.approx(v, abs=1e-4), (name, k)


@pytest.mark.parametrize("words,cut", [(75, False), (76, True), (200, True)])
def test_clip_truncated_counts_the_context(models, words, cut):
    """75 words + start + end = 77 tokens fit; one more word is cut."""
    from ultracurate.models import clip
    m = clip.load(models[0])
    assert m.truncated([" ".join(["cat"] * words), "a cat"]) == [cut, False]


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
        rows["output_caption"].append(LONG_CAPTION if i == 1 else f"a changed photo number {i}")
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
    # row 1's output caption is over 77 tokens: scored truncated (as the direct computation
    # above, whose tokenizer truncates) and counted
    assert res.truncated_captions == {"all": 1, "task:background": 1, "task:style": 0}


def test_emuedit_missing_prediction(tmp_path, photos, models):
    clip_ref, dino_ref = models
    pred, refs, _ = _emu_layout(tmp_path, photos)
    (pred / "2.png").unlink()
    with pytest.raises(UltracurateError, match="no prediction for 1 of 4 .*idx 2"):
        evaluate("emuedit", pred, refs, clip=clip_ref, dino=dino_ref, progress=False)


def test_cli_eval_writes_json_and_prints_table(tmp_path, photos, models):
    """Text and --json both report the captions scored truncated (one, on session 30's only
    turn: in both settings); clip_t equals the truncated caption's independent score."""
    from typer.testing import CliRunner
    from ultracurate.cli import app
    clip_ref, dino_ref = models
    pred, ref, caps, want = _magicbrush_layout(tmp_path, photos,
                                               long_caption_on=("30", "30-output1.png"))
    out = tmp_path / "res.json"
    args = ["eval", "--benchmark", "magicbrush", "--predictions", str(pred), "--references",
            str(ref), "--captions", str(tmp_path / "captions.json"), "--clip", clip_ref,
            "--dino", dino_ref, "--device", "cpu", "-o", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "single_turn" in r.output and "clip_t" in r.output
    assert "77 tokens, scored truncated: single_turn 1, multi_turn 1" in r.output
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"single_turn", "multi_turn"}
    assert len(data["per_sample"]["single_turn"]) == 4
    assert [r["truncated_captions"] for r in data["per_sample"]["multi_turn"]] == [0, 1]
    rclip = RefClip(clip_ref)
    g, t = want["multi_turn"][1]
    assert data["per_sample"]["multi_turn"][1]["clip_t"] == pytest.approx(
        cos(rclip.image(Image.open(g).convert("RGB")), rclip.text(LONG_CAPTION)), abs=TOL)
    r = CliRunner().invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["truncated_captions"] == {"single_turn": 1, "multi_turn": 1}
    assert summary["written"] == str(out)
