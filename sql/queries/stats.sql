-- Queries behind `ultracurate stats`. Each block starts with "-- name: <key>" and returns
-- (label, count) rows.

-- name: anchors
SELECT 'anchors' AS label, count(*) AS n FROM anchors
UNION ALL SELECT 'without a caption', count(*) FROM anchors
    WHERE anchor_id NOT IN (SELECT anchor_id FROM anchor_captions WHERE invalid_reason IS NULL)
UNION ALL SELECT 'rejected files', count(*) FROM ingest_rejects;

-- name: captions_by_source
SELECT source AS label, count(*) AS n FROM anchor_captions WHERE invalid_reason IS NULL
GROUP BY ALL ORDER BY n DESC, label;

-- name: invalid_captions
SELECT invalid_reason AS label, count(*) AS n FROM anchor_captions
WHERE invalid_reason IS NOT NULL GROUP BY ALL ORDER BY n DESC, label;

-- name: edits_by_status
SELECT edit_status AS label, count(*) AS n FROM edits GROUP BY ALL ORDER BY n DESC;

-- name: edits_by_type
SELECT edit_type AS label, count(*) AS n FROM edits GROUP BY ALL ORDER BY n DESC;

-- name: edits_by_mode
SELECT mode AS label, count(*) AS n FROM edits GROUP BY ALL ORDER BY n DESC;

-- name: mask_class
SELECT coalesce(mask_class, 'unclassified') AS label, count(*) AS n FROM edits
WHERE mode = 'region' GROUP BY ALL ORDER BY n DESC;

-- name: candidates_by_status
SELECT CASE c.human_decision WHEN 'accept' THEN 'accepted' WHEN 'reject' THEN 'rejected'
            ELSE c.auto_status END AS label, count(*) AS n
FROM candidates c GROUP BY ALL ORDER BY n DESC;

-- name: candidates_by_type
SELECT e.edit_type AS label, count(*) AS n FROM candidates c JOIN edits e USING (edit_id)
GROUP BY ALL ORDER BY n DESC;

-- name: reject_reasons
SELECT reason AS label, count(*) AS n FROM candidate_rejects GROUP BY ALL ORDER BY n DESC;

-- name: ingest_reject_reasons
SELECT regexp_replace(reason, '^.*?: ', '') AS label, count(*) AS n FROM ingest_rejects
GROUP BY ALL ORDER BY n DESC;

-- name: failed_by_stage
SELECT stage AS label, count(*) AS n FROM stage_state WHERE state = 'failed'
GROUP BY ALL ORDER BY n DESC;

-- name: judge
SELECT label, n FROM (
    SELECT 'judged' AS label, count(*) AS n, 1 AS o FROM candidates
        WHERE judge_instruction IS NOT NULL
    UNION ALL SELECT 'invalid answers', count(*), 2 FROM candidates
        WHERE judge_invalid_reason IS NOT NULL
) WHERE n > 0 ORDER BY o;

-- name: sessions
SELECT n_turns || (CASE WHEN n_turns = 1 THEN ' turn, ' ELSE ' turns, ' END) || session_state
       AS label, count(*) AS n
FROM sessions_v GROUP BY ALL ORDER BY label;
