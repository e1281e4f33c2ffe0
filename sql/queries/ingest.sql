-- Queries of the ingest stage (ultracurate.stages.ingest).

-- name: recorded
-- The items (the runner's _uc_items: item, source, captions) an earlier ingest recorded, as
-- the anchor made from the source (or the anchor its bytes duplicate) or as a reject of it,
-- and that bring no caption that anchor lacks: the runner leaves them out unless --force. A
-- source rejected as unusable stays out whatever captions it brings.
WITH known AS (
    SELECT i.item, coalesce(a.anchor_id, r.duplicate_of) AS anchor_id
    FROM _uc_items i
    LEFT JOIN anchors a ON a.source_path = i.source
    LEFT JOIN (SELECT source_path, max(duplicate_of) AS duplicate_of
               FROM ingest_rejects GROUP BY ALL) r ON r.source_path = i.source
    WHERE a.anchor_id IS NOT NULL OR r.source_path IS NOT NULL
)
SELECT k.item AS key
FROM known k
LEFT JOIN (SELECT item, unnest(captions) AS caption FROM _uc_items) ic ON ic.item = k.item
LEFT JOIN anchor_captions c ON c.anchor_id = k.anchor_id AND c.caption = ic.caption
GROUP BY k.item, k.anchor_id
HAVING k.anchor_id IS NULL OR count(ic.caption) FILTER (WHERE c.caption IS NULL) = 0;
