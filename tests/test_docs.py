"""docs/cli.md is the CLI's real --help output, kept in sync."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_in_sync():
    env = dict(os.environ, COLUMNS="100")
    code = ("import sys; sys.path.insert(0, 'scripts'); import gen_cli_docs; "
            "sys.stdout.write(gen_cli_docs.render())")
    fresh = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=True).stdout
    assert fresh == (ROOT / "docs" / "cli.md").read_text(), \
        "docs/cli.md is stale: run `python scripts/gen_cli_docs.py`"
