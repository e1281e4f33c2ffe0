"""Export never destroys what it did not make, never leaves anything behind, and says so in one
line: --force against workspaces, their ancestors and the current directory (real subprocesses);
leftovers of killed exports removed by the next export and by gc (a real SIGKILL); a full disk
or read-only folder in all four formats (a small tmpfs where the machine lets us mount one, and
an OSError injected at the write call everywhere); errors from the media store."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ultracurate import export as ex
from ultracurate.errors import UltracurateError
from ultracurate.names import EXPORT_FORMATS as FORMATS
from ultracurate.export import MARKER, export_dataset

import test_export

BIN = str(Path(sys.executable).with_name("ultracurate"))


@pytest.fixture
def cand_ws(ingested_ws):
    return ingested_ws, test_export.add_candidates(ingested_ws)


def tree(folder: Path) -> dict[str, str]:
    """Every file under folder with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ULTRACURATE_PROGRESS="0", HF_HUB_OFFLINE="1")
    return subprocess.run([BIN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def _make_export(ws, out: Path) -> None:
    export_dataset(ws, test_export.Selection("mode = 'free'"), out, "jsonl", progress=False)


# -- --force refuses what this tool did not make ------------------------------------------------
def _case(name: str, ws, tmp: Path) -> tuple[Path, str, Path]:
    """(cwd, OUT argument, the folder that must stay as it was) for each refused case."""
    if name == "the workspace itself":
        return tmp, str(ws.root), ws.root
    if name == "its parent, from inside it":
        return ws.root, "..", tmp
    if name == "the current directory (an export)":
        _make_export(ws, tmp / "exp")
        return tmp / "exp", ".", tmp / "exp"
    if name == "a parent of the current directory (an export)":
        _make_export(ws, tmp / "exp")
        (tmp / "exp" / "sub").mkdir()
        return tmp / "exp" / "sub", "..", tmp / "exp"
    if name == "a folder that is not an export":
        (tmp / "mine").mkdir()
        (tmp / "mine" / "notes.txt").write_text("keep me")
        return tmp, str(tmp / "mine"), tmp / "mine"
    if name == "a file":
        (tmp / "afile").write_text("keep me")
        return tmp, str(tmp / "afile"), tmp
    if name == "an export that now holds a workspace":
        _make_export(ws, tmp / "exp")
        from ultracurate.workspace import Workspace
        Workspace.init(tmp / "exp" / "inner-ws")
        return tmp, str(tmp / "exp"), tmp / "exp"
    if name == "inside the media store":
        return tmp, str(ws.root / "media" / "zz"), ws.root
    raise AssertionError(name)


REFUSED = {
    "the workspace itself": "holds the workspace",
    "its parent, from inside it": "current directory",
    "the current directory (an export)": "current directory",
    "a parent of the current directory (an export)": "current directory",
    "a folder that is not an export": "not an export",
    "a file": "is a file",
    "an export that now holds a workspace": "holds an ultracurate workspace",
    "inside the media store": "media/",
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_force_refuses_what_it_did_not_make(cand_ws, tmp_path, name):
    ws, _ = cand_ws
    cwd, target, guarded = _case(name, ws, tmp_path)
    before_ws, before_guarded = tree(ws.root), tree(guarded)
    r = cli(["export", "--force", "-f", "jsonl", "-w", str(ws.root), target], cwd)
    one_line_error(r, REFUSED[name])
    assert tree(ws.root) == before_ws  # catalog, media, LanceDB untouched: no run recorded
    assert tree(guarded) == before_guarded


def test_force_replaces_an_earlier_export(cand_ws, tmp_path):
    ws, _ = cand_ws
    out = tmp_path / "out"
    _make_export(ws, out)
    (out / "stale.txt").write_text("from before")
    r = cli(["export", "--force", "-w", str(ws.root), str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (out / "stale.txt").exists() and (out / "README.md").exists()
    assert json.loads((out / MARKER).read_text())["format"] == "hf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ws"]
    r = cli(["export", "-w", str(ws.root), str(out)], tmp_path)
    one_line_error(r, "already exists", "--force")


# -- leftovers of killed exports -----------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _partial(parent: Path, name: str, pid: int, tag: str) -> Path:
    import socket
    d = parent / f".{name}.partial-{tag}"
    d.mkdir()
    (d / MARKER).write_text(json.dumps({"tool": "ultracurate", "state": "partial",
                                        "pid": pid, "host": socket.gethostname()}))
    (d / "half.parquet").write_bytes(b"x" * 1000)
    return d


def test_next_export_removes_leftovers_but_not_a_live_export(cand_ws, tmp_path):
    ws, _ = cand_ws
    dead = _partial(tmp_path, "out", _dead_pid(), "0123abcd")
    other = _partial(tmp_path, "other", _dead_pid(), "4567abcd")     # any export's, marked
    live = _partial(tmp_path, "out", os.getpid(), "89abcdef")       # still running
    moved = tmp_path / ".out.old-0a1b2c3d"                           # a file --force moved
    moved.write_text("an old file")
    foreign = tmp_path / ".notes.old-0a1b2c3d"                       # not ours, not OUT's
    foreign.write_text("someone else's")
    export_dataset(ws, None, tmp_path / "out", "wds", progress=False)
    assert not dead.exists() and not other.exists() and not moved.exists()
    assert live.exists() and foreign.exists()


def test_killed_export_leaves_a_partial_that_gc_and_the_next_export_remove(cand_ws, tmp_path):
    """SIGKILL in the middle of writing (a delay injected at the parquet write, in a real
    subprocess): the hidden partial folder stays, gc lists and removes it, the run row says
    running; the next export is unaffected."""
    ws, _ = cand_ws
    out = tmp_path / "exports" / "hf"
    code = textwrap.dedent(f"""
        import time, ultracurate.export as e
        slow = e._write_parquet
        def write(*a, **k):
            time.sleep(60)
            return slow(*a, **k)
        e._write_parquet = write
        from ultracurate.cli import main
        main(["export", "-w", {str(ws.root)!r}, {str(out)!r}])
    """)
    env = dict(os.environ, ULTRACURATE_PROGRESS="0", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.parent.glob(".hf.partial-*/" + MARKER)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = list(out.parent.glob(".hf.partial-*"))
    assert len(partial) == 1 and not out.exists()
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT state FROM runs WHERE stage = 'export'") == "running"
    r = cli(["gc", "--dry-run", "--json", "-w", str(ws.root)], tmp_path)
    assert json.loads(r.stdout)["export_leftovers"] == [str(partial[0])]
    assert partial[0].exists()
    r = cli(["gc", "-w", str(ws.root)], tmp_path)
    assert r.returncode == 0 and "1 leftovers of killed exports" in r.stdout
    assert not partial[0].exists()
    # and the next export beside a fresh leftover removes it too
    again = _partial(out.parent, "hf", _dead_pid(), "feedbeef")
    s = export_dataset(ws, None, out, progress=False)
    assert s.rows == 16 and not again.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]


# -- a full disk, a read-only folder ------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """mount(kind) -> a folder on a tmpfs that is 'full' (96 KiB) or 'ro'; skips where the
    machine does not let the tests mount one."""
    mounted = []

    def mount(kind: str) -> Path:
        d = tmp_path / f"fs-{kind}"
        d.mkdir()
        opts = "size=96k" if kind == "full" else "size=96k,ro"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.parametrize("kind,strerror", [("full", "No space left on device"),
                                           ("ro", "Read-only file system")])
@pytest.mark.parametrize("fmt", FORMATS)
def test_full_or_read_only_disk_is_one_line_and_leaves_nothing(cand_ws, small_fs, fmt, kind,
                                                               strerror):
    ws, _ = cand_ws
    fs = small_fs(kind)
    r = cli(["export", "-f", fmt, "-w", str(ws.root), str(fs / "out")], fs.parent)
    one_line_error(r, "cannot write the export to", strerror)
    assert list(fs.iterdir()) == []
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT state FROM runs WHERE stage = 'export'") == "failed"


class _SmallDisk:
    """Files that share `room` bytes, then fail as a full disk does."""

    def __init__(self, room: int):
        self.room = room

    def open(self, path):
        return _DiskFile(self, path)


class _DiskFile:
    def __init__(self, disk: _SmallDisk, path):
        self.disk, self.f = disk, open(path, "wb")

    def write(self, data):
        self.disk.room -= len(data)
        if self.disk.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("fault", ["full", "ro"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_injected_write_error_is_one_line_and_leaves_nothing(cand_ws, tmp_path, monkeypatch,
                                                             capsys, fmt, fault):
    """The same through the CLI in-process, with the OSError raised at the write call (for
    machines where no tmpfs can be mounted)."""
    from ultracurate.cli import main
    ws, _ = cand_ws

    def mkdir(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    if fault == "full":  # room for a fifth of the export: the disk fills in the middle
        monkeypatch.setattr(ex, "_open_write", _SmallDisk(60_000).open)
    else:
        monkeypatch.setattr(ex, "_mkdir", mkdir)
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(SystemExit) as e:
        main(["export", "-f", fmt, "-w", str(ws.root), str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    want = "No space left on device" if fault == "full" else "Read-only file system"
    assert len(err) == 1 and err[0] == f"error: cannot write the export to {out}: {want}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]  # the folders it made too


def test_media_store_error_is_one_line_naming_the_candidate(cand_ws, tmp_path, monkeypatch,
                                                           capsys):
    """A name the media store refuses (a tampered catalog value) is one line naming the
    candidate, before anything is written (export checks every name up front)."""
    from ultracurate.cli import main
    from ultracurate.workspace import MediaStore
    ws, facts = cand_ws
    victim = min(test_export._accepted(facts))
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET edited_image = '../../x.jpg' "
                        "WHERE candidate_id = ?", [victim])
    real = MediaStore.path

    def path(self, name):
        if "/" in name:
            raise UltracurateError(f"media name '{name}' is not a media store name")
        return real(self, name)

    monkeypatch.setattr(MediaStore, "path", path)
    with pytest.raises(SystemExit):
        main(["export", "-f", "jsonl", "-w", str(ws.root), str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: candidate {victim}: ")
    assert "'../../x.jpg' is not a media" in err[0]
    assert not (tmp_path / "o").exists()


def test_export_is_a_run(cand_ws, tmp_path):
    ws, _ = cand_ws
    s = export_dataset(ws, None, tmp_path / "o", "wds", val_fraction=0.25, progress=False)
    with ws.catalog(read_only=True) as cat:
        run = cat.query("SELECT * FROM runs WHERE run_id = ?", [s.run_id])[0]
    params = json.loads(run["params"])
    assert run["stage"] == "export" and run["state"] == "completed"
    assert run["rows_in"] == run["rows_done"] == 16 and run["ended_at"] is not None
    assert params["out"] == str(tmp_path / "o") and params["fmt"] == "wds"
    assert params["val_fraction"] == 0.25
    assert json.loads(run["selection"])["where"] == ex.DEFAULT_WHERE
