"""The package's import graph: every module imports in a fresh interpreter with no import
circle, and the library never imports the demo (its data is package data)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import ultracurate

# Run in a fresh interpreter: wraps every module load (a meta-path finder around the real
# loaders) to know which modules are still executing, and __import__ to see every request;
# a request for a module that is still executing further up is a circle.
_PROBE = r"""
import builtins, importlib, importlib.util, json, pkgutil, sys

loading, circles = [], []

class Tracker:
    def find_spec(self, name, path=None, target=None):
        if not name.startswith("ultracurate"):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                real = spec.loader.exec_module
                def exec_module(module, real=real, name=name):
                    loading.append(name)
                    try:
                        real(module)
                    finally:
                        loading.pop()
                spec.loader.exec_module = exec_module
                return spec
        return None

sys.meta_path.insert(0, Tracker())
real_import = builtins.__import__

def tracked(name, globals=None, locals=None, fromlist=(), level=0):
    if level:
        name = importlib.util.resolve_name("." * level + name, (globals or {}).get("__package__"))
    wanted = [name] + [f"{name}.{f}" for f in fromlist or () if f != "*"]
    for w in wanted:
        if w in loading and loading and loading[-1] != w and not loading[-1].startswith(w + "."):
            circles.append(loading[loading.index(w):] + [w])
    return real_import(name, globals, locals, fromlist, 0) if level else real_import(
        name, globals, locals, fromlist, level)

builtins.__import__ = tracked
import ultracurate
names = sorted(m.name for m in pkgutil.walk_packages(ultracurate.__path__, "ultracurate."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "circles": circles}))
"""


def test_every_module_imports_in_a_fresh_interpreter_without_a_circle():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["modules"]) > 60  # every module was imported, not just the package
    assert got["circles"] == []


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every ultracurate module a file imports, at top level or in a
    function (a lazy import still ties the two modules together)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {n for n in out if n.startswith("ultracurate")}


def test_the_library_never_imports_the_demo():
    """Package data (exemplars, the demo's captions) lives in ultracurate/data/: only the
    `demo` command imports the demo module."""
    root = Path(ultracurate.__file__).parent
    users = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts)
        package = module if f.name == "__init__.py" else module.rsplit(".", 1)[0]
        if "ultracurate.demo" in _imports(f, package.removesuffix(".__init__")):
            users.append(module)
    assert users == ["ultracurate.commands.demo"]
