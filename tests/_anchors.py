"""Test helper: give anchors exactly these captions (what a test would otherwise ingest)."""


def set_captions(cat, captions: dict[int, list[str]], source: str = "ingest") -> None:
    """Replace the captions of each anchor id in captions (an empty list: no caption)."""
    cat.con.execute("DELETE FROM anchor_captions WHERE anchor_id IN (SELECT unnest(?))",
                    [list(captions)])
    cat.anchor_captions.merge([{"anchor_id": aid, "caption": c, "source": source}
                      for aid, caps in captions.items() for c in caps], None)
