"""Output a script can read and a person can stand.

Every command that takes --json, found by walking the CLI (a new command is covered without
editing this file, unless it needs arguments: then CASES names them), runs on one tiny
workspace, the pipeline's steps in order: ingest, caption, generate, score, review and export as
separate processes, the rest batched in one process captured at its file descriptors (what C
code and child processes such as MongoDB or Ray print is caught there too). For each: stdout
parses as JSON and holds nothing else; stderr holds only ultracurate's own lines (progress bars,
`warning:` / `error:` lines), whatever libraries the command loaded. With -v, the libraries'
own output is let through (on stderr; stdout stays JSON)."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import typer

from _clirun import ROOT, run_many

# ultracurate's own stderr lines: a finished progress bar, a warning or error, the demo's steps
BAR = re.compile(r"^[\w -]+ [━╸╺ ]+ +\d+/\d+ (-- rows/s|[\d.]+ (rows/s|s/row)) "
                 r"\d+:\d\d:\d\d ETA (\d+:\d\d:\d\d|-:--:--)$")
OWN = (BAR, re.compile(r"^(warning|error): "), re.compile(r"^== "))

# Covered elsewhere: the demo runs every stage (minutes); tests/test_demo.py runs it once,
# through the CLI with --json, and checks the same contract.
ELSEWHERE = {"demo": "tests/test_demo.py"}


def foreign_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not any(p.match(ln) for p in OWN)]


def commands() -> dict[str, object]:
    """Every command of the CLI, by its path ('models make-tiny')."""
    from ultracurate.cli import app
    out = {}

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + [name])
        else:
            out[" ".join(path)] = cmd
    walk(typer.main.get_command(app), [])
    return out


def json_commands() -> list[str]:
    return sorted(p for p, cmd in commands().items()
                  if any("--json" in prm.opts for prm in cmd.params))


def _cli(argv: list[str], env: dict) -> dict:
    """One command line as its own process, through the console entry point."""
    res = subprocess.run([sys.executable, "-c", "from ultracurate.cli import main; main()",
                          *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900)
    return {"argv": argv, "rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr}


def _emu_layout(folder, photos) -> tuple:
    """The smallest Emu Edit test set: two rows in a parquet table, two predictions."""
    import datasets
    from PIL import Image
    pred = folder / "emu_pred"
    pred.mkdir()
    ims = [Image.open(p).convert("RGB").resize((64, 64)) for p in photos[:2]]
    for i, im in enumerate(ims):
        im.transpose(Image.FLIP_LEFT_RIGHT).save(pred / f"{i}.png")
    ds = datasets.Dataset.from_dict(
        {"idx": [0, 1], "image": ims, "input_caption": ["a photo", "a picture"],
         "output_caption": ["a flipped photo", "a flipped picture"],
         "task": ["style", "style"], "instruction": ["flip it", "flip it"]},
        features=datasets.Features({
            "idx": datasets.Value("int64"), "image": datasets.Image(),
            "input_caption": datasets.Value("string"),
            "output_caption": datasets.Value("string"), "task": datasets.Value("string"),
            "instruction": datasets.Value("string")}))
    ds.to_parquet(str(folder / "emu.parquet"))
    return pred, folder / "emu.parquet"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_dir):
    """Runs the pipeline through the CLI with --json (progress bars on); returns the results
    by command path (the last run of each), all results in order, and the paths used."""
    from ultracurate.demo import write_demo_photos
    tmp = tmp_path_factory.mktemp("output")
    ws = tmp / "ws"
    table = write_demo_photos(tmp / "photos", without_captions=("coffee",))
    rows = [json.loads(x) for x in table.read_text().splitlines()]
    (tmp / "ip2p.jsonl").write_text(json.dumps({
        "input": rows[0]["captions"][0], "edit": "make it snowy",
        "output": rows[0]["captions"][0] + " in the snow"}) + "\n")
    pred, emu = _emu_layout(tmp, sorted(p for p in (tmp / "photos").iterdir()
                                        if p.suffix in (".png", ".jpg")))
    clip = str(tiny_dir / "clip")
    recipe = tmp / "recipe.toml"   # a recipe's steps narrate on stderr ('== filter')
    recipe.write_text('[[steps]]\nstage = "filter"\n\n[[steps]]\nstage = "balance"\n'
                      'cap = 4\n')
    w = ["-w", str(ws)]
    env = dict(os.environ, ULTRACURATE_PROGRESS="1")  # the bars must land on stderr
    env.pop("ULTRACURATE_WORKSPACE", None)
    env.pop("ULTRACURATE_VERBOSE", None)
    # (separate process?, argv); commands needing arguments are named in CASES below
    steps = [
        (False, ["models", "make-tiny", str(tiny_dir), "--json"]),
        (False, ["init", str(ws), "--profile", "tiny", "--tiny-dir", str(tiny_dir), "--json"]),
        (True, ["ingest", str(table), "--json", *w]),
        (True, ["caption", "--json", *w]),
        (False, ["instruct", "--limit", "2", "--per-anchor", "2", "--json", *w]),
        (False, ["import-instructions", str(tmp / "ip2p.jsonl"), "-f", "ip2p", "--json", *w]),
        (False, ["ground", "--box-threshold", "0", "--text-threshold", "0", "--json", *w]),
        (False, ["classify-masks", "--json", *w]),
        (True, ["generate", "-n", "1", "--size", "64", "--limit", "2", "--json", *w]),
        (True, ["score", "--json", *w]),
        (False, ["score", "--engine", "ray", "--force", "--limit", "1", "--json", *w]),
        (False, ["filter", "--json", *w]),
        (False, ["dedup", "--json", *w]),
        (False, ["balance", "--cap", "4", "--json", *w]),
        (False, ["report", str(tmp / "report.html"), "--json", *w]),
        (False, ["run", str(recipe), "--json", *w]),
        (False, ["sql", "SELECT candidate_id, reject_reasons, gen_params FROM candidates_v",
                 "--json", *w]),
        (False, ["show", "1", "--json", *w]),
        (False, ["eval", "-b", "emuedit", "--predictions", str(pred), "--references",
                 str(emu), "--clip", clip, "--metrics", "clip_dir,clip_img,l1", "--json"]),
        (False, ["stats", "-w", str(ws), "--json", "-v"]),   # -v after the command works
        (True, ["review", "--no-launch", "--json", *w]),
        (True, ["export", str(tmp / "export"), "--where", "true", "--json", *w]),
    ]
    named = {_path(a) for _, a in steps}
    # every other --json command that needs no arguments, with its defaults on this workspace
    cmds = commands()
    steps += [(False, [*p.split(), "--json", *w]) for p in json_commands()
              if p not in named and p not in ELSEWHERE
              and not any(prm.required for prm in cmds[p].params)]
    results: list[dict] = []
    batch: list[list[str]] = []

    def flush():
        if batch:
            results.extend(run_many(list(batch), env=env))
            batch.clear()
    for separate, argv in steps:
        if separate:
            flush()
            results.append(_cli(argv, env))
        else:
            batch.append(argv)
    flush()
    by_path: dict[str, list] = {}
    for r in results:
        by_path.setdefault(_path(r["argv"]), []).append(r)
    return {"by_path": by_path, "ws": ws, "tmp": tmp, "env": env, "explicit": named}


def _path(argv: list[str]) -> str:
    words = [a for a in argv if not a.startswith("-")]
    return " ".join(words[:2]) if words[0] == "models" else words[0]


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in json_commands() if p not in ELSEWHERE])
def test_json_stdout_and_quiet_stderr(pipeline, path):
    runs = pipeline["by_path"].get(path)
    assert runs, f"{path} takes --json and needs arguments: add it to the pipeline's steps"
    for r in runs:
        if path in pipeline["explicit"]:
            assert r["rc"] == 0, r
        if r["rc"] == 0:
            json.loads(r["stdout"])  # all of stdout, one JSON document, nothing else
        else:  # a refusal: an error line; stdout empty (or what it did, as JSON)
            assert r["stdout"].strip() == "" or json.loads(r["stdout"]) is not None, r
            assert [ln for ln in r["stderr"].splitlines() if ln.startswith("error: ")], r
        assert foreign_lines(r["stderr"]) == [], (r["argv"], r["stderr"][-3000:])


@pytest.mark.slow
def test_progress_bars_are_on_stderr_with_a_rate(pipeline):
    """The jobs that ran rows drew their bar on stderr, with a rate (not `--`) once rows were
    done; stdout never has one."""
    for path in ("ingest", "generate", "score", "export"):
        r = pipeline["by_path"][path][0]
        bars = [ln for ln in r["stderr"].splitlines() if BAR.match(ln)]
        assert bars, (path, r["stderr"])
        assert "-- rows/s" not in bars[-1], bars
        assert not BAR.search(r["stdout"])


@pytest.mark.slow
def test_verbose_lets_library_output_through(pipeline, tiny_dir):
    """With -v (here after the command), a library's own output reaches stderr; stdout is
    still only JSON. The same command without -v printed none (see make-tiny above)."""
    out = pipeline["tmp"] / "tiny-verbose"
    r = _cli(["models", "make-tiny", str(out), "--roles", "dino", "--json", "-v"],
             pipeline["env"])
    assert r["rc"] == 0, r
    assert set(json.loads(r["stdout"])) == {"dino"}
    assert foreign_lines(r["stderr"]), r["stderr"]


def test_verbose_log_records_print_once():
    """One handler on stderr: a FiftyOne record (whose own handler writes to stdout) and a
    root record (`logging.warning`, which adds a second handler when there is none) each
    print once, on stderr; without -v neither prints."""
    code = (
        "import logging, sys\n"
        "from ultracurate import quiet\n"
        "quiet.configure(verbose=sys.argv[1] == 'v')\n"
        "import fiftyone\n"
        "logging.getLogger('fiftyone.core.odm.database').warning('a mongodb notice')\n"
        "logging.warning('a root notice')\n"
        "logging.getLogger('ultracurate.x').warning('our own line')\n")
    for mode in ("v", "q"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                             text=True, timeout=300, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert res.stdout == ""
        lines = res.stderr.splitlines()
        assert sum("our own line" in ln for ln in lines) == 1, lines
        for text in ("a mongodb notice", "a root notice"):
            assert sum(text in ln for ln in lines) == (1 if mode == "v" else 0), lines


@pytest.mark.slow
def test_csv_holds_list_and_struct_columns(pipeline):
    """select and sql -f csv write list, struct, map and blob values as JSON (or hex) text,
    one row a line, where they used to fail."""
    w = ["-w", str(pipeline["ws"])]
    sel, lit, anchors = run_many([
        ["select", "--columns", "candidate_id,reject_reasons,gen_params,mask_bbox", "-f", "csv",
         *w],
        ["sql", "SELECT {'a': 1, 'b': [1, 2]} AS s, [3, 4] AS l, map([1], ['x']) AS m, "
                "'\\xAB'::BLOB AS b, NULL::INTEGER[] AS n", "-f", "csv", *w],
        ["select", "--from", "anchors", "--columns", "anchor_id,captions", "-f", "csv", *w],
    ])
    for r in (sel, lit, anchors):
        assert r["rc"] == 0 and foreign_lines(r["stderr"]) == [], r
    rows = list(csv.DictReader(io.StringIO(sel["stdout"])))
    assert rows and all(json.loads(r["gen_params"])["mode"] in ("free", "region") for r in rows)
    assert all(r["reject_reasons"] == "" or isinstance(json.loads(r["reject_reasons"]), list)
               for r in rows)
    [row] = list(csv.DictReader(io.StringIO(lit["stdout"])))
    assert json.loads(row["s"]) == {"a": 1, "b": [1, 2]} and json.loads(row["l"]) == [3, 4]
    assert row["b"] == "ab" and row["n"] == "" and json.loads(row["m"])
    from ultracurate.workspace import Workspace
    with Workspace(pipeline["ws"]).catalog(read_only=True) as cat:
        want = {r["anchor_id"]: r["captions"] for r in cat.query(
            "SELECT anchor_id, captions FROM anchors_v")}
    got = {int(r["anchor_id"]): json.loads(r["captions"])
           for r in csv.DictReader(io.StringIO(anchors["stdout"]))}
    assert got == want


def test_help_is_for_people():
    """Every command: -h works as --help does; its help names no function or module of
    ultracurate (run_score, ultracurate.stages...); an option that takes a comma list shows
    it in its metavar (--types TYPE,TYPE, not <str>); no command takes -h or -v itself (the
    root's -v is accepted anywhere on the line)."""
    import ast

    import click
    internal = {node.name for f in (ROOT / "ultracurate").rglob("*.py")
                for node in ast.walk(ast.parse(f.read_text()))
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                and "_" in node.name.strip("_")}
    cmds = commands()
    res = run_many([[*p.split(), "-h"] for p in cmds] + [["-h"]])
    for r in res:
        assert r["rc"] == 0 and r["stdout"].startswith("Usage: ultracurate"), r
        words = set(re.findall(r"[A-Za-z_][\w.]*", r["stdout"]))
        assert not {w for w in words if w.startswith("ultracurate.")}, r["argv"]
        assert not words & internal, (r["argv"], words & internal)
    for path, cmd in cmds.items():
        ctx = click.Context(cmd)
        for prm in cmd.params:
            assert not {"-h", "-v", "--verbose"} & set(prm.opts), (path, prm.opts)
            if isinstance(prm, click.Option) and re.search(r"comma", prm.help or "", re.I):
                assert "," in prm.make_metavar(ctx), (path, prm.opts, prm.make_metavar(ctx))


@pytest.mark.parametrize("argv,want", [
    (["generate", "--limit", "2", "-v"], ["-v", "generate", "--limit", "2"]),
    (["--verbose", "stats"], ["--verbose", "stats"]),
    (["sql", "SELECT 1", "-v", "-v"], ["-v", "sql", "SELECT 1"]),
    (["select", "--", "-v"], ["select", "--", "-v"]),       # after --, a value
    (["stats"], ["stats"]),
])
def test_verbose_is_hoisted_before_the_command(argv, want):
    from ultracurate.cli import hoist_verbose
    assert hoist_verbose(argv) == want


# -- the progress bar --------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _rendered(job) -> str:
    from rich.console import Console
    out = io.StringIO()
    Console(file=out, width=200).print(job.progress.make_tasks_table(job.progress.tasks))
    return out.getvalue()


def test_rate_and_eta_after_one_update():
    """rich's own speed needs two samples within its window (a 512 px batch on the CPU takes
    longer): the bar computes rows/elapsed itself, so one update gives a rate and an ETA."""
    from ultracurate.progress import JobBar
    clock = Clock()
    job = JobBar(100, "generate", get_time=clock)
    assert "-- rows/s" in _rendered(job) and "ETA -:--:--" in _rendered(job)
    clock.t = 80.0
    job.advance(16)          # one batch in 80 s
    assert job.progress.tasks[0].speed is None   # what rich alone would show as --
    text = _rendered(job)
    assert "16/100" in text and "5.0 s/row" in text and "ETA 0:07:00" in text, text
    clock.t = 100.0
    job(8)                   # half of the next batch of 16 done, reported by the stage
    text = _rendered(job)
    assert "24/100" in text and "ETA 0:05:16" in text, text


def test_stage_progress_moves_the_bar_inside_a_batch(ingested_ws):
    """A stage's `ctx.progress(done, total)` moves the runner's bar within the batch in hand
    (by that share of its rows) before the batch commits; the Context ships to a Ray worker
    without it."""
    from ultracurate.runner import BatchResult, Context, RowStage, run

    class Halves(RowStage):   # no class name: not registered among the real stages
        table = "anchors"
        columns = "anchor_id"
        batch_size = 4
        seen: list = []

        def process(self, rows, prepared, ctx):
            ctx.progress(1, 2)
            self.seen.append(ctx.on_progress.completed)
            ctx.progress(2, 2)
            self.seen.append(ctx.on_progress.completed)
            return BatchResult()
    stage = Halves()
    stage.name = "test-halves"
    summary = run(ingested_ws, stage, progress=True)
    n = summary.rows_in
    assert n > 4
    want = []
    for start in range(0, n, 4):
        size = min(4, n - start)
        want += [start + size / 2, start + size]
    assert stage.seen == want
    ctx = Context("/x", on_progress=lambda rows: None, batch_rows=3)
    assert pickle.loads(pickle.dumps(ctx)).on_progress is None


# -- show ----------------------------------------------------------------------------------------
def test_show_is_a_readable_summary(ingested_ws, capsys):
    """show ID: the mask as its class, area and bbox (not kilobytes of RLE), gen_params as
    compact key=value pairs, scores in a small table, empty fields left out; --full prints
    every field whole; --json keeps the full data."""
    import numpy as np

    from _scoring import add_candidates, set_scores
    from ultracurate import masks
    from ultracurate.cli import main
    from ultracurate.runner import run
    ws = ingested_ws
    cands = add_candidates(ws, n_edits=2, per_edit=1, modes=("region", "free"))
    cid, eid = int(cands["candidate_id"][0]), int(cands["edit_id"][0])
    with ws.catalog() as cat:
        h, w = cat.query("SELECT height, width FROM anchors_v a JOIN edits e USING (anchor_id) "
                         "WHERE edit_id = ?", [eid])[0].values()
        m = np.random.default_rng(0).random((h, w)) > 0.5   # a mask with a long RLE
        m[: h // 2] = False
        rle = masks.encode(m)
        cat.con.execute("UPDATE edits SET mask_rle = ?, mask_height = ?, mask_width = ?, "
                        "mask_class = NULL WHERE edit_id = ?", [rle, h, w, eid])
        cat.con.execute("UPDATE candidates SET gen_params = ? WHERE candidate_id = ?", [
            json.dumps({"mode": "region", "total_steps": 10, "strength": 0.3,
                        "mask": {"variant": "ultraedit", "rle": rle, "version": 1}}), cid])
    run(ws, "classify-masks", progress=False)
    set_scores(ws, {cid: {"clip_sim_dir": 0.2512345, "ssim": 0.9, "l2": 1.5e-5}})
    assert len(rle) > 2000

    def show(*extra):
        main(["show", str(cid), "-w", str(ws.root), *extra])   # returns: it succeeded
        return capsys.readouterr().out
    text = show()
    assert rle not in text and len(text) < 4000
    line = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip()
            for ln in text.splitlines() if ":" in ln and not ln.startswith(" " * 20)}
    with ws.catalog(read_only=True) as cat:
        area, bbox, cls = cat.query("SELECT mask_area, mask_bbox, mask_class FROM edits_v "
                                    "WHERE edit_id = ?", [eid])[0].values()
    assert line["mask"].startswith(f"{cls}, {100 * area:.1f}% of {w}x{h}, bbox x {bbox[0]} "
                                   f"y {bbox[1]} w {bbox[2]} h {bbox[3]}"), line["mask"]
    assert ("gen_params: mode=region total_steps=10 strength=0.3 mask={variant=ultraedit "
            f"rle={rle[:12]}...<{len(rle)} chars> version=1}}") in " ".join(text.split())
    assert "clip_sim_dir" in line["scores"] and "0.2512" in line["scores"]
    assert re.search(r"^ +ssim +0\.9000$", text, re.M) and re.search(r"l2 +1\.500e-05", text)
    assert "human_decision" not in line          # empty: left out
    full = show("--full")
    assert rle in full and "human_decision: None" in full
    data = json.loads(show("--json"))
    assert data["mask_rle"] == rle and data["gen_params"]["mask"]["rle"] == rle
