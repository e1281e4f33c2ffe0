"""A workspace: one folder holding the catalog, the LanceDB embeddings, the media store and the
config.

    DIR/ultracurate.toml   config (models profile and per-role overrides, defaults)
    DIR/catalog.duckdb     the catalog
    DIR/lance/             LanceDB (embeddings keyed by row id)
    DIR/media/ab/<sha256>.<ext>   content-addressed media (written to media/tmp, then renamed)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tomllib
import uuid
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from .errors import UltracurateError

if TYPE_CHECKING:  # imported where used, so that MediaStore alone needs no DuckDB
    from .catalog import Catalog

CONFIG_NAME = "ultracurate.toml"
ENV_VAR = "ULTRACURATE_WORKSPACE"

DEFAULT_CONFIG: dict[str, Any] = {
    "models": {"profile": "ultraedit"},
}


class MediaStore:
    """Files named by the sha256 of their bytes. A write goes to media/tmp/ first and is
    renamed into place, so a killed job never leaves half a file under its final name."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"

    def path(self, name: str) -> Path:
        return self.root / name[:2] / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def put_bytes(self, data: bytes, ext: str) -> str:
        name = hashlib.sha256(data).hexdigest() + "." + ext.lower().lstrip(".")
        dest = self.path(name)
        if dest.exists():
            return name
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        return name

    def put_file(self, src: str | Path, ext: str | None = None) -> str:
        src = Path(src)
        return self.put_bytes(src.read_bytes(), ext or src.suffix.lstrip(".") or "bin")

    def names(self):
        """Every file name in the store (not the partial ones in tmp/)."""
        for sub in self.root.iterdir():
            if sub.is_dir() and sub.name != "tmp" and len(sub.name) == 2:
                for f in sub.iterdir():
                    yield f.name

    def clean_tmp(self) -> int:
        """Remove partial files a killed job left behind; returns how many."""
        if not self.tmp.exists():
            return 0
        n = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        return n


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not (self.root / CONFIG_NAME).exists():
            raise UltracurateError(f"{self.root} is not an ultracurate workspace "
                                   f"(no {CONFIG_NAME}; create one with `ultracurate init`)")
        self.config = tomllib.loads((self.root / CONFIG_NAME).read_text())
        self.media = MediaStore(self.root / "media")

    # -- creation and discovery -----------------------------------------------------------
    @classmethod
    def init(cls, root: str | Path, config: dict | None = None) -> "Workspace":
        root = Path(root)
        if (root / CONFIG_NAME).exists():
            raise UltracurateError(f"{root} is already a workspace")
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("media", "lance", "exports"):
            (root / sub).mkdir(exist_ok=True)
        cfg = {k: dict(v) for k, v in DEFAULT_CONFIG.items()}
        for section, values in (config or {}).items():
            cfg.setdefault(section, {}).update(values)
        import tomli_w

        from .catalog import Catalog
        (root / CONFIG_NAME).write_text(tomli_w.dumps(cfg))
        Catalog(root / "catalog.duckdb").close()
        return cls(root)

    @classmethod
    def find(cls, explicit: str | Path | None = None) -> "Workspace":
        """--workspace, else $ULTRACURATE_WORKSPACE, else the current directory or a parent."""
        if explicit:
            return cls(explicit)
        if os.environ.get(ENV_VAR):
            return cls(os.environ[ENV_VAR])
        here = Path.cwd().resolve()
        for d in (here, *here.parents):
            if (d / CONFIG_NAME).exists():
                return cls(d)
        raise UltracurateError("no workspace here: pass --workspace DIR, set "
                               f"{ENV_VAR}, or run `ultracurate init DIR`")

    # -- parts ----------------------------------------------------------------------------
    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def lance_path(self) -> Path:
        return self.root / "lance"

    def catalog(self, read_only: bool = False) -> "Catalog":
        from .catalog import Catalog
        return Catalog(self.catalog_path, read_only=read_only)

    def set_config(self, section: str, values: dict) -> None:
        import tomli_w
        self.config.setdefault(section, {}).update(values)
        tmp = self.root / (CONFIG_NAME + ".tmp")
        tmp.write_text(tomli_w.dumps(self.config))
        os.replace(tmp, self.root / CONFIG_NAME)

    def section(self, name: str) -> dict:
        return dict(self.config.get(name, {}))

    def unreferenced_media(self, cat: "Catalog") -> list[str]:
        """Media files no catalog row points at: what a killed job's rerun made differently,
        or what belonged to rows since deleted."""
        used = {r[0] for r in cat.con.execute(
            "SELECT media FROM anchors UNION SELECT source_image FROM candidates "
            "UNION SELECT edited_image FROM candidates").fetchall() if r[0]}
        return sorted(n for n in self.media.names() if n not in used)

    def remove(self) -> None:
        shutil.rmtree(self.root)
