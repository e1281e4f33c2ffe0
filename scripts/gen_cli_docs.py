"""Write docs/cli.md from the CLI's own --help output (tests/test_docs.py checks it is in
sync): python scripts/gen_cli_docs.py"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def render() -> str:
    from ultracurate.cli import app
    root = typer.main.get_command(app)
    out = ["# Command reference", "",
           "Generated from `--help` by `scripts/gen_cli_docs.py`; `tests/test_docs.py` fails "
           "when it is out of date.", ""]

    def walk(cmd, path):
        ctx = cmd.make_context(" ".join(path), [], resilient_parsing=True)
        out.extend([f"## `{' '.join(path)}`", "", "```text",
                    cmd.get_help(ctx).rstrip(), "```", ""])
        for name in sorted(getattr(cmd, "commands", {})):
            walk(cmd.commands[name], path + [name])
    walk(root, ["ultracurate"])
    return "\n".join(out)


if __name__ == "__main__":
    import os
    os.environ["COLUMNS"] = "100"
    (ROOT / "docs" / "cli.md").write_text(render())
    print("wrote docs/cli.md")
