-- Queries of the ingest stage (ultracurate.stages.ingest).

-- name: recorded_items
-- Items (registered _sources: item, source) already recorded by an earlier ingest, with the
-- anchor each maps to (the one made from it, or the one its bytes duplicate; NULL for a file
-- rejected as unusable) and how many of its captions (registered _item_captions: item,
-- caption) that anchor lacks.
WITH known AS (
    SELECT s.item, coalesce(a.anchor_id, r.duplicate_of) AS anchor_id
    FROM _sources s
    LEFT JOIN anchors a ON a.source_path = s.source
    LEFT JOIN (SELECT source_path, max(duplicate_of) AS duplicate_of
               FROM ingest_rejects GROUP BY ALL) r ON r.source_path = s.source
    WHERE a.anchor_id IS NOT NULL OR r.source_path IS NOT NULL
)
SELECT k.item, any_value(k.anchor_id) AS anchor_id,
       count(ic.caption) FILTER (WHERE c.caption IS NULL) AS new_captions
FROM known k
LEFT JOIN _item_captions ic ON ic.item = k.item
LEFT JOIN anchor_captions c ON c.anchor_id = k.anchor_id AND c.caption = ic.caption
GROUP BY k.item;
