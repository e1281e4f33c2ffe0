"""A workspace: one folder holding the catalog, the LanceDB embeddings, the media store and the
config.

    DIR/ultracurate.toml   config (models profile and per-role overrides, defaults)
    DIR/catalog.duckdb     the catalog
    DIR/lance/             LanceDB (embeddings keyed by row id)
    DIR/media/ab/<sha256>.<ext>   content-addressed media (written to media/tmp, then renamed);
                                  or elsewhere: [media] url, a folder or an s3:// bucket
    DIR/tmp/               a running job's working files (its pending rows)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tomllib
import uuid
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from . import procs
from .errors import UltracurateError

if TYPE_CHECKING:  # imported where used, so that MediaStore alone needs no DuckDB
    from .catalog import Catalog

CONFIG_NAME = "ultracurate.toml"
ENV_VAR = "ULTRACURATE_WORKSPACE"

DEFAULT_CONFIG: dict[str, Any] = {
    "models": {"profile": "ultraedit"},
}


# A media name: the sha256 of the file's bytes and a short extension. Catalog values become
# paths only through MediaStore.path, which refuses anything else ('../../x.jpg', '/etc/x').
MEDIA_NAME = re.compile(r"[0-9a-f]{64}\.[a-z0-9]{1,8}")


def remove_dead_files(folder: Path) -> int:
    """Remove the files of folder that processes now gone left (named by `procs.tag()`);
    returns how many."""
    if not folder.exists():
        return 0
    n = 0
    for p in folder.iterdir():
        if p.is_file() and not procs.tag_alive(p.name):
            p.unlink(missing_ok=True)
            n += 1
    return n


class MediaStore:
    """Files named by the sha256 of their bytes, in a folder or a bucket (through fsspec).

    The store's location is the workspace config's `[media] url`: a folder (the default,
    `<workspace>/media`; a relative path is under the workspace; a shared mount is a folder
    every node sees at the same path) or an fsspec URL such as `s3://bucket/prefix` (s3fs; the
    endpoint and credentials come from the standard environment variables, AWS_* and
    AWS_ENDPOINT_URL, or `[media] endpoint_url`; they are never written into the catalog).
    A local write goes to tmp/ first and is renamed into place, so a killed job never leaves
    half a file under its final name; an object store's single put is atomic already."""

    def __init__(self, root: Path | str, storage_options: dict | None = None):
        import fsspec
        url = str(root)
        self.fs, base = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.local = "file" in _protocols(self.fs)
        self.url = url
        if self.local:
            self.root = Path(base)
            self.tmp = self.root / "tmp"
        else:
            self.root = None    # no local folder: read and write through self.fs
            self.base = base.rstrip("/")

    @classmethod
    def of(cls, workspace_root: Path, section: dict) -> "MediaStore":
        """The store a workspace's [media] section names (default: <workspace>/media)."""
        section = dict(section or {})
        unknown = sorted(set(section) - {"url", "endpoint_url", "storage_options"})
        if unknown:
            raise UltracurateError(f"[media] {unknown[0]}: unknown setting (url, "
                                   "endpoint_url, storage_options)")
        url = str(section.get("url") or "media")
        options = dict(section.get("storage_options") or {})
        if "://" not in url:
            url = str((workspace_root / url).resolve())
        elif section.get("endpoint_url"):
            options.setdefault("client_kwargs", {})["endpoint_url"] = section["endpoint_url"]
        return cls(url, options)

    @staticmethod
    def check_name(name) -> str:
        """name, if it is a media name; else UltracurateError (a tampered catalog value)."""
        if not isinstance(name, str) or not MEDIA_NAME.fullmatch(name):
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
            raise UltracurateError(f"catalog value {shown} is not a media name "
                                   "(<sha256>.<ext>): the catalog was changed outside "
                                   "ultracurate; nothing read or written")
        return name

    def _key(self, name: str) -> str:
        name = self.check_name(name)
        return f"{self.base}/{name[:2]}/{name}"

    def path(self, name: str) -> Path:
        """The file's local path (a local store only; see `local_path`)."""
        name = self.check_name(name)
        if not self.local:
            raise UltracurateError(f"the media store {self.url} is not a folder: read "
                                   "media through it (read_bytes, load_rgb)")
        return self.root / name[:2] / name

    def where(self, name: str) -> str:
        """Where a file lives, for messages."""
        return str(self.path(name)) if self.local else f"{self.fs.unstrip_protocol(self._key(name))}"

    def exists(self, name: str) -> bool:
        return self.path(name).exists() if self.local else self.fs.exists(self._key(name))

    def read_bytes(self, name: str) -> bytes:
        """A file's bytes (FileNotFoundError when the store lacks it)."""
        if self.local:
            return self.path(name).read_bytes()
        return self.fs.cat_file(self._key(name))

    def load_rgb(self, name: str, max_pixels: int | None = None):
        """The file decoded to RGB, or BadImage naming it (missing, unreadable, not an
        image)."""
        return self.inspect(name, max_pixels)[1]

    def inspect(self, name: str, max_pixels: int | None = None):
        """(ImageInfo, RGB image) of the file, or BadImage naming it."""
        from .images import MAX_PIXELS, BadImage, inspect_image, read_bytes
        if self.local:
            data = read_bytes(self.path(name))
        else:
            try:
                data = self.read_bytes(name)
            except FileNotFoundError:
                raise BadImage(f"{self.where(name)}: file not found") from None
            except OSError as e:
                raise BadImage(f"{self.where(name)}: cannot read ({e})") from None
        return inspect_image(data, self.where(name), max_pixels or MAX_PIXELS)

    def size(self, name: str) -> int:
        return self.path(name).stat().st_size if self.local else int(
            self.fs.size(self._key(name)))

    def remove(self, name: str) -> None:
        if self.local:
            self.path(name).unlink(missing_ok=True)
        elif self.fs.exists(self._key(name)):
            self.fs.rm_file(self._key(name))

    def local_path(self, name: str, cache: Path) -> Path:
        """A local file holding the media (tools that open paths: FiftyOne): the store's own
        file, or for a bucket a copy under cache (fetched once; names are content hashes)."""
        if self.local:
            return self.path(name)
        dest = Path(cache) / name[:2] / self.check_name(name)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(f".{uuid.uuid4().hex}.part")
            tmp.write_bytes(self.read_bytes(name))
            os.replace(tmp, dest)
        return dest

    def put_bytes(self, data: bytes, ext: str) -> str:
        name = self.check_name(hashlib.sha256(data).hexdigest() + "." + ext.lower().lstrip("."))
        if not self.local:
            # One PUT: the object appears whole or not at all. No HEAD first: a name is its
            # bytes' hash, so writing it again changes nothing.
            self.fs.pipe_file(self._key(name), data)
            return name
        dest = self.path(name)
        if dest.exists():
            return name
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        # named by the writing process, so that another job's clean_tmp leaves it alone
        tmp = self.tmp / f"{procs.tag()}~{uuid.uuid4().hex}.part"
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
        """Every media file name in the store (not the partial ones in tmp/, nor files of
        other names that someone put there: gc never touches those)."""
        if not self.local:
            for key in self.fs.find(self.base):
                sub, _, name = key[len(self.base) + 1:].partition("/")
                if MEDIA_NAME.fullmatch(name) and name[:2] == sub:
                    yield name
            return
        if not self.root.exists():
            return
        for sub in self.root.iterdir():
            if sub.is_dir() and sub.name != "tmp" and len(sub.name) == 2:
                for f in sub.iterdir():
                    if MEDIA_NAME.fullmatch(f.name) and f.name[:2] == sub.name and f.is_file():
                        yield f.name

    def clean_tmp(self) -> int:
        """Remove partial files a killed job left behind (never those of a process that still
        runs: another job writing beside this one); returns how many. A bucket has none (an
        object store's put is whole or absent)."""
        return remove_dead_files(self.tmp) if self.local else 0

    def check(self) -> None:
        """Refuse (one line) a store this process cannot reach: a folder it cannot create or
        write, a bucket that does not exist or refuses these credentials."""
        try:
            if self.local:
                self.root.mkdir(parents=True, exist_ok=True)
                if not os.access(self.root, os.W_OK):
                    raise PermissionError("not writable")
                return
            bucket = self.base.split("/", 1)[0]
            self.fs.ls(bucket, refresh=True)
        except Exception as e:
            why = " ".join(str(e).split())[:200] or type(e).__name__
            raise UltracurateError(f"media store {self.url} is not reachable: {why} (see "
                                   "[media] in ultracurate.toml)") from None


def _protocols(fs) -> tuple:
    p = fs.protocol
    return tuple(p) if isinstance(p, (tuple, list)) else (p,)


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not (self.root / CONFIG_NAME).exists():
            raise UltracurateError(f"{self.root} is not an ultracurate workspace "
                                   f"(no {CONFIG_NAME}; create one with `ultracurate init`)")
        self.config = tomllib.loads((self.root / CONFIG_NAME).read_text())
        self._media = None

    @classmethod
    def attached(cls, root: str | Path, config: dict) -> "Workspace":
        """The workspace at root with the config the driver read (a Ray worker: the folder
        need not exist on its node when media lives in a bucket and models are hub ids or
        shared paths)."""
        ws = cls.__new__(cls)
        ws.root, ws.config, ws._media = Path(root), config, None
        return ws

    @property
    def media(self) -> MediaStore:
        if self._media is None:
            self._media = MediaStore.of(self.root, self.section("media"))
        return self._media

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

    @property
    def scratch(self) -> Path:
        """DIR/tmp: a job's working files (its pending rows), named by its process."""
        return self.root / "tmp"

    def catalog(self, read_only: bool = False, allow_files: bool = False,
                wait: float | None = None) -> "Catalog":
        """The catalog; opening waits up to `wait` seconds (default: catalog.lock_wait())
        while another process holds a conflicting lock."""
        from .catalog import Catalog
        return Catalog(self.catalog_path, read_only=read_only, allow_files=allow_files,
                       wait=wait)

    def set_config(self, section: str, values: dict) -> None:
        import tomli_w
        self.config.setdefault(section, {}).update(values)
        self._media = None
        tmp = self.root / (CONFIG_NAME + ".tmp")
        tmp.write_text(tomli_w.dumps(self.config))
        os.replace(tmp, self.root / CONFIG_NAME)

    def section(self, name: str) -> dict:
        return dict(self.config.get(name, {}))

    def check_media_names(self, cat: "Catalog", sql: str, params: dict | None, key: str,
                          columns: tuple[str, ...]) -> None:
        """Refuse (UltracurateError naming the row) when a media column of the rows sql
        selects holds a value that is not a media name: checked in one query before a command
        that reads or removes media by name changes anything."""
        bad = " OR ".join(f"({col} IS NOT NULL AND NOT regexp_full_match({col}, $_uc_media))"
                          for col in columns)
        row = cat.con.execute(
            f"SELECT {key}, {', '.join(columns)} FROM ({sql}) checked WHERE {bad} LIMIT 1",
            {**(params or {}), "_uc_media": MEDIA_NAME.pattern}).fetchone()
        if row is not None:
            value = next(v for v in row[1:] if v is not None and not MEDIA_NAME.fullmatch(v))
            try:
                self.media.check_name(value)
            except UltracurateError as e:
                raise UltracurateError(f"{key.removesuffix('_id')} {row[0]}: {e}") from None

    def unreferenced_media(self, cat: "Catalog") -> list[str]:
        """Media files no catalog row points at: what a killed job's rerun made differently,
        or what belonged to rows since deleted. Refuses a catalog holding a value that is not a
        media name, since every file it once named would look unreferenced; and refuses while
        a job runs, since a job writes its media before the batch that names it commits."""
        from .runs import live_runs
        live = live_runs(cat)
        if live:
            raise UltracurateError(
                f"run {', '.join(map(str, live))} is still running and writes media the "
                "catalog does not name yet; collect garbage when no job runs "
                "(see `ultracurate runs`)")
        self.check_media_names(cat, "SELECT * FROM anchors", None, "anchor_id", ("media",))
        self.check_media_names(cat, "SELECT * FROM candidates", None, "candidate_id",
                               ("source_image", "edited_image"))
        used = {r[0] for r in cat.con.execute(
            "SELECT media FROM anchors UNION SELECT source_image FROM candidates "
            "UNION SELECT edited_image FROM candidates").fetchall() if r[0]}
        return sorted(n for n in self.media.names() if n not in used)

    def remove(self) -> None:
        shutil.rmtree(self.root)
