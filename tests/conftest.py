"""Shared fixtures: real DuckDB workspaces, the demo's real photos, tiny checkpoints on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("ULTRACURATE_PROGRESS", "0")
# FiftyOne's MongoDB for the whole session lives in a temporary folder, not ~/.fiftyone (a
# user's own database is used instead when FIFTYONE_DATABASE_URI is set).
if not os.environ.get("FIFTYONE_DATABASE_URI") and "FIFTYONE_DATABASE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["FIFTYONE_DATABASE_DIR"] = tempfile.mkdtemp(prefix="uc-fodb-")
    # registered before FiftyOne is imported, so it runs after FiftyOne's own exit handlers;
    # only this session's processes use this folder's mongod (review.connect_database)
    atexit.register(shutil.rmtree, os.environ["FIFTYONE_DATABASE_DIR"], True)

from ultracurate.workspace import Workspace  # noqa: E402


@pytest.fixture(scope="session")
def demo_photos(tmp_path_factory) -> Path:
    """The demo's real photos (scikit-image) and their captions table."""
    from ultracurate.demo import write_demo_photos
    return write_demo_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Folder for tiny checkpoints, shared by the session. Build the roles a test needs with
    `ultracurate.models.make_tiny(tiny_dir, ("clip",))` (idempotent)."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture
def ws(tmp_path, tiny_dir) -> Workspace:
    """An empty workspace using the tiny models profile."""
    return Workspace.init(tmp_path / "ws", {"models": {"profile": "tiny",
                                                        "tiny_dir": str(tiny_dir)}})


@pytest.fixture
def ingested_ws(ws, demo_photos) -> Workspace:
    """A workspace with the demo's photos ingested as anchors."""
    from ultracurate.runner import run
    from ultracurate.stages.ingest import IngestStage, discover
    run(ws, IngestStage(items=discover([demo_photos])), progress=False)
    return ws
