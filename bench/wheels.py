"""Fill .whl/ with exactly the wheels bench/gpu.sh carries to the device machine, and check that
they fit.

    .venv/bin/python bench/wheels.py            # download, check, print the sizes
    .venv/bin/python bench/wheels.py --check    # check what .whl/ holds, no download

The names come from bench/device-wheels.txt, the versions from requirements/constraints.txt
(every carried wheel is pinned there). Each is downloaded with pip (no dependencies, binary
only) for the device's Python 3.12 on manylinux x86-64, as the device notes' recipe says; a
wheel in .whl/ that is not on the list is removed. Then, for every wheel, each requirement that
applies there must be carried too or be in the device image (bench/device-image.txt), at a
version it accepts where the image's version is known, or be listed with '!' as declared but
never imported. Last, the wheels and the working tree
that travels with them (tracked files and untracked ones git does not ignore) must total less
than 64 MiB, what one device call carries. Exit 1, with the reasons, when any check fails.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
LIMIT = 64 * 2**20                     # bytes one device call carries, working tree included
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# the device machine's interpreter, for the requirements' markers
DEVICE_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
              "platform_machine": "x86_64", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(path: Path, mark: str = "") -> dict[str, str | None]:
    """A list file's names (normalised) -> its ==version or None; with mark, only the lines
    that start with it, else only those that do not."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and (line.startswith(mark) if mark else not line.startswith("!")):
            name, _, version = line[len(mark):].partition("==")
            out[norm(name)] = version or None
    return out


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            out[norm(name.split("[")[0])] = version.strip()
    return out


def wheel_key(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return norm(name), version


def requires(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    return [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def travelling_tree() -> int:
    """Bytes of the working tree a device call sends: tracked files and untracked ones that
    git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    return sum((ROOT / f).stat().st_size for f in out.split("\0")
               if f and (ROOT / f).is_file() and not (ROOT / f).is_symlink())


def download(wanted: dict[str, str]) -> None:
    WHEELS.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(WHEELS)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + [f"{n}=={v}" for n, v in wanted.items()], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="check .whl/ as it is, no download")
    args = ap.parse_args()
    carried = names(ROOT / "bench" / "device-wheels.txt")
    unused = names(ROOT / "bench" / "device-wheels.txt", mark="!")
    image = names(ROOT / "bench" / "device-image.txt")
    pinned = pins(ROOT / "requirements" / "constraints.txt")
    errors = [f"{n}: not pinned in requirements/constraints.txt" for n in carried
              if n not in pinned]
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        return 1
    wanted = {n: pinned[n] for n in carried}
    if not args.check:
        download(wanted)
        for w in WHEELS.glob("*.whl"):   # exactly the list: stale versions and names go
            n, v = wheel_key(w)
            if wanted.get(n) != v:
                w.unlink()
                print(f"removed {w.name} (not on bench/device-wheels.txt at this version)")
    have = {wheel_key(w)[0]: w for w in sorted(WHEELS.glob("*.whl"))}
    for n, v in wanted.items():
        if n not in have:
            errors.append(f"{n}=={v}: no wheel in .whl/")
        elif wheel_key(have[n])[1] != v:
            errors.append(f"{have[n].name}: not the pinned {n}=={v}")
    errors += [f"{w.name}: not on bench/device-wheels.txt" for n, w in have.items()
               if n not in wanted]
    for n, w in have.items():
        for req in requires(w):
            if req.marker is not None and not req.marker.evaluate(DEVICE_ENV):
                continue                          # an extra's, or for another platform
            dep = norm(req.name)
            if dep in unused:
                continue
            if dep in carried:
                version = wanted[dep]
            elif dep in image:
                version = image[dep]
            else:
                errors.append(f"{w.name} requires {req}: neither carried nor in the image")
                continue
            if version and req.specifier and not req.specifier.contains(Version(version),
                                                                        prereleases=True):
                where = "carried" if dep in carried else "in the image"
                errors.append(f"{w.name} requires {req}: {dep} {version} {where}")
    wheels = sum(w.stat().st_size for w in have.values())
    tree = travelling_tree()
    print(f"{len(have)} wheels in .whl/: {wheels / 2**20:.1f} MiB; working tree "
          f"{tree / 2**20:.1f} MiB; together {(wheels + tree) / 2**20:.1f} MiB of the "
          f"{LIMIT // 2**20} MiB a device call carries")
    for w in have.values():
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    if wheels + tree >= LIMIT:
        errors.append(f"wheels and working tree total {(wheels + tree) / 2**20:.1f} MiB, "
                      f"not under {LIMIT // 2**20} MiB")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
