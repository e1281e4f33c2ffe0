-- Views that --where predicates select from. Re-created on every open (after migrations), so a
-- new column shows up here without a migration of its own. Column names are unique across the
-- join so that a user writes edit_type = 'replace' wherever they select.

CREATE OR REPLACE VIEW anchors_v AS
SELECT a.* FROM anchors a;

CREATE OR REPLACE VIEW edits_v AS
SELECT e.*,
       a.media        AS anchor_media,
       a.source_path  AS anchor_path,
       a.dataset      AS dataset,
       a.width        AS anchor_width,
       a.height       AS anchor_height,
       a.conversion   AS anchor_conversion,
       a.duplicate_of AS anchor_duplicate_of   -- the anchor is a near-duplicate (dedup)
FROM edits e JOIN anchors a USING (anchor_id);

-- status: a human decision overrides the automatic one, and survives re-filtering.
CREATE OR REPLACE VIEW candidates_v AS
SELECT c.*,
       CASE c.human_decision WHEN 'accept' THEN 'accepted'
                             WHEN 'reject' THEN 'rejected'
                             ELSE c.auto_status END AS status,
       e.* EXCLUDE (edit_id, created_at)
FROM candidates c JOIN edits_v e USING (edit_id);
