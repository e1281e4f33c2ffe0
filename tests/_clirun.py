"""Run many ultracurate command lines through the real entry point (`ultracurate.cli.main`) in
ONE subprocess, so that a table of CLI cases pays Python's imports once instead of per case.

    results = run_many([["select", "--where", "x"], ...], env={...})   # from a test

Each case's exit code, stdout and stderr come back, captured at the file descriptors (so what C
code and child processes print is there too, as in a separate process); an exception that
escapes `main` is printed as the traceback a user would see and reported with rc None. Cases
run in order, in the same process, as a user running them one after another would (minus the
imports).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_many(cases: list[list[str]], env: dict | None = None, cwd: str | Path | None = None,
             timeout: float = 600) -> list[dict]:
    """Run each argv in cases through ultracurate's main; [{'rc', 'stdout', 'stderr'}]."""
    e = dict(os.environ, ULTRACURATE_PROGRESS="0")
    e.pop("ULTRACURATE_WORKSPACE", None)
    e.update(env or {})
    res = subprocess.run([sys.executable, __file__], input=json.dumps(cases), text=True,
                         capture_output=True, env=e, cwd=cwd or ROOT, timeout=timeout)
    marker = res.stdout.rfind("\n@@CLIRUN@@")
    if res.returncode != 0 or marker < 0:
        raise AssertionError(f"the CLI batch process failed (rc {res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout[marker + len("\n@@CLIRUN@@"):])


def one_line_error(result: dict, *fragments: str, code: int | None = None) -> str:
    """Assert result is a refusal: non-zero exit, stderr exactly one line `error: ...` holding
    every fragment, no traceback. Returns the line."""
    lines = [ln for ln in result["stderr"].splitlines() if ln.strip()]
    assert result["rc"] not in (0, None), result
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert "Traceback" not in result["stderr"] + result["stdout"]
    if code is not None:
        assert result["rc"] == code, result
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _captured(fn) -> tuple[str, str]:
    """Run fn with file descriptors 1 and 2 on temporary files: what Python writes to
    sys.stdout / sys.stderr, what C code writes to them and what child processes inherit,
    as a separate process's stdout and stderr would hold it."""
    import tempfile
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            fn()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", errors="replace"))
    return texts[0], texts[1]


def _main() -> None:
    import traceback

    from ultracurate.cli import main
    cases = json.loads(sys.stdin.read())
    out = []
    for argv in cases:
        rc = [0]

        def case(argv=argv, rc=rc):
            try:
                main(list(argv))
            except SystemExit as x:
                rc[0] = x.code if isinstance(x.code, int) else (0 if x.code is None else 1)
            except BaseException:
                traceback.print_exc()
                rc[0] = None
        stdout, stderr = _captured(case)
        out.append({"argv": argv, "rc": rc[0], "stdout": stdout, "stderr": stderr})
    sys.stdout.write("\n@@CLIRUN@@" + json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    _main()
