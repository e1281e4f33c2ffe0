-- Views that --where predicates select from (and sessions_v: `select --from sessions`).
-- Re-created on every open (after migrations), so a new column shows up here without a
-- migration of its own. Column names are unique across the join so that a user writes
-- edit_type = 'replace' wherever they select.

-- captions: the anchor's usable captions in order of arrival (caption_sources beside them,
-- one source per caption); [] when it has none. A predicate on them aggregates
-- anchor_captions, so it costs seconds at millions of anchors (bench/results/caption.md).
CREATE OR REPLACE VIEW anchors_v AS
SELECT a.*,
       coalesce(c.captions, []) AS captions,
       coalesce(c.caption_sources, []) AS caption_sources
FROM anchors a LEFT JOIN (
    SELECT anchor_id,
           list(caption ORDER BY caption_index) AS captions,
           list(source ORDER BY caption_index) AS caption_sources
    FROM anchor_captions WHERE invalid_reason IS NULL GROUP BY anchor_id
) c USING (anchor_id);

-- mask_bbox: the mask's box [x, y, w, h] in pixels, from its four scalar columns (a list
-- column cost a whole-row rewrite on every update: migration 011).
CREATE OR REPLACE VIEW edits_v AS
SELECT e.*,
       CASE WHEN e.mask_bbox_x IS NOT NULL
            THEN [e.mask_bbox_x, e.mask_bbox_y, e.mask_bbox_w, e.mask_bbox_h] END AS mask_bbox,
       a.media        AS anchor_media,
       a.source_path  AS anchor_path,
       a.dataset      AS dataset,
       a.width        AS anchor_width,
       a.height       AS anchor_height,
       a.conversion   AS anchor_conversion,
       a.duplicate_of AS anchor_duplicate_of,  -- the anchor is a near-duplicate (dedup)
       -- an anchor made by `chain`: the session and turn it is the source of, and the
       -- candidate whose edited image it is
       a.session_id   AS anchor_session_id,
       a.turn         AS anchor_turn,
       a.parent_candidate_id
FROM edits e JOIN anchors a USING (anchor_id);

-- status: a human decision overrides the automatic one, and survives re-filtering.
-- reject_reasons: every reason filter recorded for the row (candidate_rejects, one row per
-- reason), in filter's order; NULL when it has none. A query that does not read it does not
-- pay for the join (DuckDB prunes it).
-- session_id, turn: the multi-turn session this candidate is a turn of (NULL for most rows;
-- see sessions_v).
CREATE OR REPLACE VIEW candidates_v AS
SELECT c.*,
       r.reject_reasons,
       CASE c.human_decision WHEN 'accept' THEN 'accepted'
                             WHEN 'reject' THEN 'rejected'
                             ELSE c.auto_status END AS status,
       e.* EXCLUDE (edit_id, created_at),
       st.session_id,
       st.turn
FROM candidates c
LEFT JOIN (SELECT candidate_id, list(reason ORDER BY reason_index) AS reject_reasons
           FROM candidate_rejects GROUP BY candidate_id) r USING (candidate_id)
JOIN edits_v e USING (edit_id)
LEFT JOIN session_turns st USING (candidate_id);

-- One row per multi-turn session (`chain`) with its turns in order: their candidates,
-- instructions, edit types and statuses. session_state: 'open' (a later chain run may add a
-- turn) or 'ended' (a turn yielded no accepted candidate: ended_turn, end_reason).
CREATE OR REPLACE VIEW sessions_v AS
SELECT s.*,
       CASE WHEN s.ended_turn IS NULL THEN 'open' ELSE 'ended' END AS session_state,
       coalesce(t.n_turns, 0) AS n_turns,
       coalesce(t.turn_candidates, []) AS turn_candidates,
       coalesce(t.turn_instructions, []) AS turn_instructions,
       coalesce(t.turn_edit_types, []) AS turn_edit_types,
       coalesce(t.turn_statuses, []) AS turn_statuses
FROM sessions s LEFT JOIN (
    SELECT cv.session_id,
           count(*) AS n_turns,
           list(cv.candidate_id ORDER BY cv.turn) AS turn_candidates,
           list(cv.instruction ORDER BY cv.turn) AS turn_instructions,
           list(cv.edit_type ORDER BY cv.turn) AS turn_edit_types,
           list(cv.status ORDER BY cv.turn) AS turn_statuses
    FROM candidates_v cv WHERE cv.session_id IS NOT NULL GROUP BY cv.session_id
) t USING (session_id);
