-- Writes shaped for the columnar engine (issue 15). DuckDB rewrites a whole row to update a
-- list column, so filter's `reject_reasons VARCHAR[]` cost 52 s of a 70 s run at 4.1M rows
-- and classify-masks' `mask_bbox INTEGER[]` 0.40 s per 4,096 rows (0.006 s without it).

-- Reject reasons: one row per candidate and reason, in the order filter gives them. filter
-- deletes a selected row's old reasons and appends its new ones; candidates_v aggregates
-- them back into a `reject_reasons` list for --where and readers.
CREATE TABLE candidate_rejects (
    candidate_id  BIGINT NOT NULL,
    reason_index  INTEGER NOT NULL,   -- order within the candidate's reasons, from 0
    reason        VARCHAR NOT NULL,   -- e.g. 'clip_sim_dir < 0.22'
    filter_run    BIGINT              -- the filter run that recorded it
);

INSERT INTO candidate_rejects (candidate_id, reason_index, reason, filter_run)
SELECT candidate_id, (i - 1)::INTEGER, reject_reasons[i], filter_run
FROM (SELECT candidate_id, filter_run, reject_reasons,
             generate_subscripts(reject_reasons, 1) AS i
      FROM candidates WHERE reject_reasons IS NOT NULL)
WHERE reject_reasons[i] IS NOT NULL;

ALTER TABLE candidates DROP COLUMN reject_reasons;

-- The mask's bounding box as four scalar columns (x, y, w, h in pixels); edits_v keeps a
-- `mask_bbox` list of them for --where and readers.
ALTER TABLE edits ADD COLUMN mask_bbox_x INTEGER;
ALTER TABLE edits ADD COLUMN mask_bbox_y INTEGER;
ALTER TABLE edits ADD COLUMN mask_bbox_w INTEGER;
ALTER TABLE edits ADD COLUMN mask_bbox_h INTEGER;
UPDATE edits SET mask_bbox_x = mask_bbox[1], mask_bbox_y = mask_bbox[2],
                 mask_bbox_w = mask_bbox[3], mask_bbox_h = mask_bbox[4]
WHERE mask_bbox IS NOT NULL;
ALTER TABLE edits DROP COLUMN mask_bbox;
