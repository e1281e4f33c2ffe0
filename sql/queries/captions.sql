-- Caption writes and counts (ultracurate.catalog.Captions: cat.anchor_captions).

-- name: add
-- New captions from the registered table _captions (anchor_id, caption, source, model,
-- prompt, invalid_reason, ord): the first of equal texts per anchor, none the anchor already
-- has, appended after its last caption in `ord` order. $lo/$hi bound the batch's anchor ids so
-- that DuckDB reads only the row groups that hold them (zone maps), not every caption.
INSERT INTO anchor_captions (anchor_id, caption_index, caption, source, model, prompt, run_id,
                             invalid_reason, created_at)
SELECT n.anchor_id,
       (coalesce(m.last, -1) + row_number() OVER (PARTITION BY n.anchor_id ORDER BY n.ord))
           ::INTEGER,
       n.caption, n.source, n.model, n.prompt, $run_id, n.invalid_reason, $at
FROM (SELECT * FROM _captions
      QUALIFY row_number() OVER (PARTITION BY anchor_id, caption ORDER BY ord) = 1) n
LEFT JOIN (SELECT anchor_id, max(caption_index) AS last FROM anchor_captions
           WHERE anchor_id BETWEEN $lo AND $hi GROUP BY anchor_id) m USING (anchor_id)
WHERE NOT EXISTS (SELECT 1 FROM anchor_captions c
                  WHERE c.anchor_id BETWEEN $lo AND $hi
                    AND c.anchor_id = n.anchor_id AND c.caption = n.caption);

-- name: remove_source
-- A captioner's earlier captions of some anchors (caption --force redoes them).
DELETE FROM anchor_captions
WHERE anchor_id BETWEEN $lo AND $hi AND anchor_id IN (SELECT anchor_id FROM _anchors)
  AND source = $source;

-- name: without_caption
-- Anchors with no usable caption.
SELECT count(*) AS n FROM anchors
WHERE anchor_id NOT IN (SELECT anchor_id FROM anchor_captions WHERE invalid_reason IS NULL);
