-- Queries of the generate stage (ultracurate.stages.generate).

-- name: edits_to_plan
-- The edits a selection picks (the placeholder in braces: SQL giving their edit_id), in edit_id
-- order, with what planning reads and the candidate indices each already has.
WITH e AS (SELECT edit_id FROM ({edits}) picked)
SELECT v.edit_id, v.mode, v.edit_status, v.mask_rle, v.mask_height, v.mask_width,
       v.mask_area, v.mask_contours, v.mask_class, v.source_caption, v.target_caption,
       coalesce(h.have, []) AS have
FROM edits_v v SEMI JOIN e USING (edit_id)
LEFT JOIN (SELECT c.edit_id, list(c.candidate_index) AS have
           FROM candidates c SEMI JOIN e USING (edit_id) GROUP BY c.edit_id) h USING (edit_id)
ORDER BY v.edit_id;
