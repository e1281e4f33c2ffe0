-- Queries of multi-turn chains (ultracurate.stages.chain). {rank_order} is the filter's
-- ranking (stages.filter.RANK_ORDER), put in by the caller.

-- name: roots
-- The chain's roots among the selected candidates (the caller's query takes the place of the
-- 'selected' marker): the best accepted candidate of each edit on a photo.
SELECT candidate_id, edit_id, anchor_id FROM ({selected}) sel
QUALIFY row_number() OVER (PARTITION BY edit_id ORDER BY {rank_order}) = 1;

-- name: start_sessions
-- A session, from $first on, for each root (registered _roots) whose edit roots none yet.
INSERT INTO sessions (session_id, root_candidate_id, root_anchor_id, chain_run, created_at)
SELECT $first - 1 + row_number() OVER (ORDER BY r.candidate_id), r.candidate_id, r.anchor_id,
       $run, $at
FROM _roots r
WHERE r.edit_id NOT IN (SELECT c.edit_id FROM sessions s
                        JOIN candidates c ON c.candidate_id = s.root_candidate_id)
  AND r.candidate_id NOT IN (SELECT candidate_id FROM session_turns);

-- name: first_turns
-- Turn 1 of every session that lacks it: its root.
INSERT INTO session_turns (session_id, turn, candidate_id, chain_run, created_at)
SELECT session_id, 1, root_candidate_id, $run, $at FROM sessions
WHERE session_id NOT IN (SELECT session_id FROM session_turns WHERE turn = 1);

-- name: chain_sessions
-- The sessions rooted in the edits of _roots.
SELECT s.session_id FROM sessions s JOIN candidates c ON c.candidate_id = s.root_candidate_id
WHERE c.edit_id IN (SELECT edit_id FROM _roots) ORDER BY s.session_id;

-- name: due
-- Sessions of $sessions that can take turn $turn: not ended, with turn $turn - 1 and not
-- $turn. With the candidate they continue from, its edited image and target caption, and
-- the anchor an earlier run made of it (NULL when none yet).
SELECT s.session_id, t.candidate_id AS parent_candidate_id, c.edited_image,
       e.target_caption, a.anchor_id
FROM sessions s
JOIN session_turns t ON t.session_id = s.session_id AND t.turn = $turn - 1
JOIN candidates c ON c.candidate_id = t.candidate_id
JOIN edits e ON e.edit_id = c.edit_id
LEFT JOIN anchors a ON a.session_id = s.session_id AND a.turn = $turn
WHERE list_contains($sessions, s.session_id) AND s.ended_turn IS NULL
  AND s.session_id NOT IN (SELECT session_id FROM session_turns WHERE turn = $turn)
ORDER BY s.session_id;

-- name: outcome
-- Turn $turn of the sessions $sessions: per session, its anchor, the best accepted candidate
-- (NULL: none), how many edits and candidates the turn made, and whether any of its work is
-- unfinished (the anchor not instructed, a row a stage failed, a candidate not decided): such
-- a session waits for a rerun instead of ending.
WITH ta AS (SELECT anchor_id, session_id FROM anchors
            WHERE turn = $turn AND list_contains($sessions, session_id)),
te AS (SELECT e.edit_id, ta.session_id FROM edits e JOIN ta USING (anchor_id)),
tc AS (SELECT cv.candidate_id, cv.status, cv.human_decision, cv.clip_sim_dir, te.session_id
       FROM candidates_v cv JOIN te USING (edit_id)),
best AS (SELECT session_id, candidate_id FROM tc WHERE status = 'accepted'
         QUALIFY row_number() OVER (PARTITION BY session_id ORDER BY {rank_order}) = 1),
failed AS (SELECT key, stage FROM stage_state WHERE state = 'failed'),
unfinished AS (
    SELECT session_id FROM ta
    WHERE anchor_id NOT IN (SELECT key FROM stage_state
                            WHERE stage = 'instruct' AND state = 'done')
    UNION SELECT te.session_id FROM te JOIN failed f
        ON f.key = te.edit_id AND f.stage IN ('ground', 'classify-masks')
    UNION SELECT tc.session_id FROM tc JOIN failed f
        ON f.key = tc.candidate_id AND f.stage IN ('generate', 'score', 'judge')
    UNION SELECT session_id FROM tc WHERE status NOT IN ('accepted', 'rejected'))
SELECT ta.session_id, ta.anchor_id, b.candidate_id AS best,
       (SELECT count(*) FROM te WHERE te.session_id = ta.session_id) AS edits,
       (SELECT count(*) FROM tc WHERE tc.session_id = ta.session_id) AS candidates,
       ta.session_id IN (SELECT session_id FROM unfinished) AS unfinished
FROM ta LEFT JOIN best b USING (session_id)
ORDER BY ta.session_id;

-- name: at_turn
-- Sessions of $sessions with an anchor for turn $turn that neither have that turn nor ended:
-- the ones a run's stages work on for that turn.
SELECT a.session_id FROM anchors a JOIN sessions s USING (session_id)
WHERE a.turn = $turn AND list_contains($sessions, a.session_id) AND s.ended_turn IS NULL
  AND a.session_id NOT IN (SELECT session_id FROM session_turns WHERE turn = $turn)
ORDER BY a.session_id;
