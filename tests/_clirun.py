"""Run many ultracurate command lines through the real entry point (`ultracurate.cli.main`) in
ONE subprocess, so that a table of CLI cases pays Python's imports once instead of per case.

    results = run_many([["select", "--where", "x"], ...], env={...})   # from a test

Each case's exit code, stdout and stderr come back; an exception that escapes `main` is printed
as the traceback a user would see and reported with rc None. Cases run in order, in the same
process, as a user running them one after another would (minus the imports).
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


def _main() -> None:
    import contextlib
    import io
    import traceback

    from ultracurate.cli import main
    cases = json.loads(sys.stdin.read())
    out = []
    real_stdout = sys.stdout
    for argv in cases:
        o, e = io.StringIO(), io.StringIO()
        rc = 0
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            try:
                main(list(argv))
            except SystemExit as x:
                rc = x.code if isinstance(x.code, int) else (0 if x.code is None else 1)
            except BaseException:
                traceback.print_exc()
                rc = None
        out.append({"argv": argv, "rc": rc, "stdout": o.getvalue(), "stderr": e.getvalue()})
    real_stdout.write("\n@@CLIRUN@@" + json.dumps(out))
    real_stdout.flush()


if __name__ == "__main__":
    _main()
