"""The generation loop on the tiny SDXL-architecture editor, loaded by path like a real
checkpoint: schedules, token alignment, shared starting latent, attention control, region blend,
determinism, and the released code's latents (golden fixture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _compat_cases as C
from ultracurate.generation import (CallDropped, Pair, Trace, euler_ancestral_step,
                                    generate_compat, generate_method, run_pairs, sample_method)
from ultracurate.generation import params as P
from ultracurate.generation.attention import AttentionEdit, align_tokens, refine_mapper
from ultracurate.generation.behaviour import released_mapper_error
from ultracurate.images import load_rgb, resize_center_crop, to_jpeg_bytes
from ultracurate.models import editor, make_tiny

GOLDEN = Path(__file__).parent / "data" / "generate_compat_golden.npz"
GOLDEN_512 = Path(__file__).parent / "data" / "generate_compat_golden_512.npz"
SRC, TGT = "a photo of a cat on a sofa", "a photo of a dog on a red sofa"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    ref = make_tiny(tiny_dir, ("editor",))["editor"]
    return editor.load(ref, "cpu", torch.float32)


@pytest.fixture(scope="module")
def anchor(demo_photos):
    photo = sorted(p for p in demo_photos.parent.iterdir() if p.suffix in (".jpg", ".png"))[0]
    return resize_center_crop(load_rgb(photo), 64)


def free_params(steps=5, frac=0.6):
    return {"mode": "free", "total_steps": steps, "strength": 0.6, "guidance": 0.5,
            "self_replace_frac": frac, "cross_replace_frac": frac}


def test_tiny_editor_is_a_real_sdxl_pipeline(pipe):
    import open_clip
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert ids == open_clip.get_tokenizer("ViT-B-32")("a photo of a cat")[0][:7].tolist()
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    heads = {m.heads for m in pipe.unet.modules() if type(m).__name__ == "Attention"}
    assert heads and all(h % 2 == 0 for h in heads)


@pytest.mark.parametrize("steps,strength,expected", [
    (3, 0.6, [332]), (5, 0.6, [599, 399, 199]), (8, 0.6, [499, 374, 249, 124]),
    (10, 0.3, [299, 199, 99]), (14, 0.3, [285, 213, 142, 70])])
def test_real_timesteps_per_steps_and_strength(pipe, steps, strength, expected):
    ts, sigmas = P.schedule(pipe.scheduler, steps, strength)
    assert ts.tolist() == expected
    assert len(sigmas) == len(expected) + 1 and sigmas[-1] == 0


def test_token_alignment_maps_shared_tokens_to_the_source():
    src, tgt = [49406, 320, 2368, 525, 320, 49407], [49406, 320, 1929, 2368, 525, 320, 49407]
    assert align_tokens(src, tgt) == [0, 1, -1, 2, 3, 4, 5]


def test_refine_mapper_aligns_shared_words(pipe):
    mapper, alphas = refine_mapper(pipe.tokenizer, SRC, TGT)
    s, t = pipe.tokenizer.encode(SRC), pipe.tokenizer.encode(TGT)
    for j, tok in enumerate(t):
        if alphas[j]:
            assert s[int(mapper[j])] == tok
    new = [pipe.tokenizer.decode([t[j]]).strip() for j in range(len(t)) if not alphas[j]]
    assert "red" in new and "dog" in new
    assert mapper[len(t):].tolist() == list(range(len(t), 77))


def test_method_seed_params_are_the_methods_ranges():
    for s in range(40):
        f = sample_method(s, "free")
        assert f["total_steps"] in (3, 5, 8) and f["strength"] == 0.6
        assert 0.4 <= f["guidance"] <= 0.8 and 0.1 <= f["self_replace_frac"] <= 0.9
        r = sample_method(s, "region")
        assert r["total_steps"] in (10, 14) and r["strength"] == 0.3
        assert r["guidance"] in (0.0, 0.2, 0.4, 0.6)
        assert r["soft_value"] is None or r["soft_value"] in (0.0, 0.1, 0.3, 0.5, 0.7, 0.8)
    assert sample_method(3, "free") == sample_method(3, "free")


def test_compat_seed_protocol_draw_order():
    import random
    prm = P.sample_compat(1234, "free")
    torch.manual_seed(1234)
    random.seed(1234)
    frac = 0.1 + torch.rand(()).item() * 0.8
    torch.rand(())  # the unused guidance draw
    assert prm["self_replace_frac"] == frac == prm["cross_replace_frac"]
    assert prm["total_steps"] == random.choice([3, 5, 8])
    assert prm["guidance"] == random.uniform(0.4, 0.8)
    state = torch.get_rng_state()
    P.sample_compat(1234, "free")  # leaves the generator where the pipeline starts drawing
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("behaviour", ["method", "ultraedit-compat"])
def test_pair_shares_its_initial_latent(pipe, anchor, behaviour):
    pairs = [Pair(SRC, TGT, anchor, free_params(), 5), Pair("a sofa", "a red sofa", anchor,
                                                           free_params(8), 6)]
    tr = Trace()
    if behaviour == "method":
        generate_method(pipe, pairs, trace=tr)
    else:
        generate_compat(pipe, pairs, 77, "free", trace=tr)
    assert torch.equal(tr.start[0], tr.start[1]) and torch.equal(tr.start[2], tr.start[3])
    assert not torch.equal(tr.start[0], tr.start[2])
    if behaviour == "ultraedit-compat":  # the released code keeps a noise row per prompt
        assert not torch.equal(tr.noise[0], tr.noise[1])
    else:
        assert torch.equal(tr.noise[0], tr.noise[1])


def test_method_attention_control_changes_the_target_only(pipe, anchor):
    def run(frac, store=False):
        edit = AttentionEdit(store=store)
        out = generate_method(pipe, [Pair(SRC, TGT, anchor, free_params(8, frac), 9)],
                              edit=edit)
        return out[0], edit
    off, _ = run(0.0)
    on, edit = run(0.9, store=True)
    assert np.array_equal(np.asarray(off.source), np.asarray(on.source))
    assert not np.array_equal(np.asarray(off.edited), np.asarray(on.edited))
    mapper, alphas = refine_mapper(pipe.tokenizer, SRC, TGT)
    cross = [p for _, is_cross, p in edit.maps if is_cross]
    selfs = [p for _, is_cross, p in edit.maps if not is_cross]
    assert cross and selfs
    for probs in cross:  # (2, heads, queries, 77): target's aligned tokens = source's maps
        src, tgt = probs[0], probs[1]
        aligned = alphas.bool()
        assert torch.equal(tgt[..., aligned], src[..., mapper[aligned]])
        assert not torch.allclose(tgt[..., ~aligned], src[..., ~aligned])
    for probs in selfs:  # coarse layers: the target uses the source's self-attention map
        assert probs.shape[-1] <= 4 and torch.allclose(probs[0], probs[1], atol=1e-6)


def test_compat_head_split_edits_only_the_second_half_of_rows(pipe, anchor):
    edit = AttentionEdit(behaviour="ultraedit-compat", store=True)
    out, prm = generate_compat(pipe, [Pair(SRC, TGT, anchor, {}, 0)], 7, "free", edit=edit)
    mapper, alphas = refine_mapper(pipe.tokenizer, SRC, TGT)
    n_real = P.real_steps(prm["total_steps"], prm["strength"])
    cross_steps = int((n_real + 1) * prm["cross_replace_frac"])
    assert cross_steps >= 1
    layers = len({n for n, _, _ in edit.maps})
    first_step = edit.maps[:layers]
    for name, is_cross, probs in first_step:
        if not is_cross:
            continue
        heads = probs.shape[0] // 2
        target = probs[heads:].view(2, heads // 2, *probs.shape[1:])  # (base, replaced) halves
        aligned = alphas.bool()
        assert torch.equal(target[1][..., aligned], target[0][..., mapper[aligned]])
    # The source never receives anything: its image does not depend on the fraction.
    again, _ = generate_compat(pipe, [Pair(SRC, TGT, anchor, {}, 0)], 7, "free",
                               edit=AttentionEdit(behaviour="ultraedit-compat", enabled=False))
    assert np.array_equal(np.asarray(out[0].source), np.asarray(again[0].source))
    assert not np.array_equal(np.asarray(out[0].edited), np.asarray(again[0].edited))


def hard_mask():
    m = np.zeros((8, 8), np.float32)
    m[2:6, 3:7] = 1.0
    return m


@pytest.mark.parametrize("behaviour,steps", [("method", 14), ("ultraedit-compat", 10)])
def test_region_blend_outside_a_hard_mask_follows_the_anchor_path(pipe, anchor, behaviour,
                                                                  steps):
    prm = {"mode": "region", "total_steps": steps, "strength": 0.3, "guidance": 0.0,
           "self_replace_frac": 0.5, "cross_replace_frac": 0.5, "soft_value": None}
    pair = Pair(SRC, TGT, anchor, prm, 3, mask=hard_mask())
    tr = Trace()
    if behaviour == "method":
        run_pairs(pipe, [pair], "method", trace=tr)
    else:  # the released region call seeded at 0, with this pair's schedule
        P.seed_everything(0)
        run_pairs(pipe, [pair], "ultraedit-compat", trace=tr)
    _, sigmas = P.schedule(pipe.scheduler, steps, 0.3)
    n_real = len(sigmas) - 1
    outside = torch.from_numpy(hard_mask() == 0)
    for i, z in enumerate(tr.steps):
        renoised = tr.anchor_latents + tr.noise * sigmas[i + 1]
        expected = tr.anchor_latents if i == n_real - 1 else renoised
        if i % 2 == 1 or (behaviour == "method" and i == n_real - 1):
            assert i in tr.blended
            assert torch.allclose(z[..., outside], expected[..., outside], atol=1e-6)
            assert not torch.allclose(z[..., ~outside], expected[..., ~outside])
        else:
            assert not torch.allclose(z[..., outside], expected[..., outside])
    if behaviour == "ultraedit-compat":  # 3 real steps: the last index (2) is even, no blend
        assert tr.blended == [1]
    else:  # 4 real steps: odd steps 1 and 3, and 3 is the last (clean anchor latent)
        assert tr.blended == [1, 3]


def test_same_seed_same_images(pipe, anchor):
    def jpegs(seed):
        out = generate_method(pipe, [Pair(SRC, TGT, anchor, sample_method(seed, "free"),
                                          seed)])[0]
        return to_jpeg_bytes(out.source), to_jpeg_bytes(out.edited)
    assert jpegs(4) == jpegs(4)
    assert jpegs(4) != jpegs(5)


def test_method_images_do_not_depend_on_the_batch(pipe, anchor):
    other = Image.fromarray(np.asarray(anchor)[::-1].copy())
    alone = generate_method(pipe, [Pair(SRC, TGT, anchor, sample_method(4, "free"), 4)])[0]
    mixed = generate_method(pipe, [Pair("a tree", "a pine tree", other,
                                        sample_method(8, "free"), 8),
                                   Pair(SRC, TGT, anchor, sample_method(4, "free"), 4)])[1]
    diff = np.abs(np.asarray(alone.edited, int) - np.asarray(mixed.edited, int))
    assert diff.max() <= 1


def test_compat_reproduces_the_released_code(pipe):
    """Golden latents from UltraEdit's released pipelines run on this tiny checkpoint (see
    docs/generation.md for how they were made and how to regenerate them)."""
    g = np.load(GOLDEN)
    ims = [Image.fromarray(a) for a in g["anchors"]]
    caps = [("a photo of a cat on a sofa", "a photo of a dog on a red sofa"),
            ("a man riding a horse", "a man riding a zebra in the snow")]
    from ultracurate.masks import resize_nearest
    edit_l = resize_nearest(g["edit_mask"], (8, 8))
    outer_l = resize_nearest(g["outer_mask"], (8, 8))

    def mask_fn(soft):
        m = edit_l.astype(np.float32)
        if soft is not None:
            m[edit_l != outer_l] = soft
        return m
    for mode, seed in (("free", 7), ("free", 98765), ("region", 11), ("region", 4242)):
        pairs = [Pair(s, t, im, {}, 0, mask=mask_fn if mode == "region" else None)
                 for (s, t), im in zip(caps, ims)]
        tr = Trace()
        out, _ = generate_compat(pipe, pairs, seed, mode, trace=tr)
        lat = torch.from_numpy(g[f"{mode}_{seed}_latents"])
        assert (tr.final - lat).abs().max().item() < 1e-5, (mode, seed)
        pix = np.stack([np.asarray(x) for p in out for x in (p.source, p.edited)])
        assert np.abs(pix.astype(int) - g[f"{mode}_{seed}_images"].astype(int)).max() <= 1


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", sorted(C.GOLDEN_CASES))
def test_compat_reproduces_the_released_code_at_512(pipe, case, threads):
    """The released pipelines' latents and images at 512 px, 7 free-form pairs and 6 region
    pairs with the soft mask, made by scripts/make_compat_golden.py (which says how), at 1
    and 2 CPU threads: ultraedit-compat encodes, lays out and batches as the released call."""
    g = np.load(GOLDEN_512)
    mode, seed, n = C.GOLDEN_CASES[case]
    assert str(g[f"{case}_inputs"]) == C.input_digest(n), "the golden inputs changed"
    masks = C.edit_masks(n) if mode == "region" else [(None, None)] * n
    pairs = [Pair(s, t, im, {}, 0, mask=C.mask_fn(e, o, 64) if mode == "region" else None)
             for (s, t), im, (e, o) in zip(C.captions(n), C.anchors(n), masks)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tr = Trace()
        _, prm = generate_compat(pipe, pairs, seed, mode, trace=tr)
    finally:
        torch.set_num_threads(before)
    assert prm["total_steps"] == int(g[f"{case}_total_steps"])
    assert (prm.get("soft_value") or -1.0) == float(g[f"{case}_soft_value"])
    s, k = C.LATENT_STRIDE, C.IMAGE_STRIDE
    latents = torch.from_numpy(g[f"{case}_latents"])
    images = torch.from_numpy(g[f"{case}_images"])
    assert tr.final.shape[0] == latents.shape[0] == 2 * n
    assert (tr.final[..., ::s, ::s] - latents).abs().max().item() < 1e-5
    assert (tr.images[..., ::k, ::k] - images).abs().max().item() < 1e-5


def test_euler_ancestral_step_is_the_schedulers_step(pipe):
    """The named step function against diffusers' EulerAncestralDiscreteScheduler.step, with
    the same noise, at every real step of a schedule."""
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(8)
    z, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i, t in enumerate(sched.timesteps):
        gen = torch.Generator().manual_seed(i)
        theirs = sched.step(eps, t, z, generator=gen).prev_sample
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(i))
        ours = euler_ancestral_step(z, eps, sched.sigmas[i], sched.sigmas[i + 1], noise)
        assert torch.allclose(ours, theirs, atol=1e-6), i


LONG = " ".join(["photosynthesizing"] * 30)     # 30 words, 92 tokens


@pytest.mark.parametrize("prompts,fails", [
    ([SRC, TGT], False),
    ([SRC, LONG], True),                      # a later prompt over 77 tokens
    ([SRC, TGT, LONG, TGT], True),            # another pair's source counts too
    ([LONG, SRC], True),                      # the first prompt long: its EOS aligns past 77
    ([SRC, " ".join(["photosynthesizing"] * 25)], False),   # 77 tokens exactly
])
def test_released_mapper_fails_on_long_prompts(pipe, prompts, fails):
    assert len(pipe.tokenizer.encode(" ".join(["photosynthesizing"] * 25))) == 77
    assert (released_mapper_error(pipe.tokenizer, prompts) is not None) == fails


def test_compat_call_with_a_long_prompt_is_dropped(pipe, anchor):
    pairs = [Pair(SRC, TGT, anchor, {}, 0), Pair("a sofa", LONG, anchor, {}, 0)]
    with pytest.raises(CallDropped, match="92 tokens"):
        generate_compat(pipe, pairs, 3, "free")
    out = generate_method(pipe, [Pair("a sofa", LONG, anchor, sample_method(3, "free"), 3)])
    assert out[0].edited.size == (64, 64)      # method truncates the alignment to 77 tokens
