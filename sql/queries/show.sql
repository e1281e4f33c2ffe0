-- Queries behind `ultracurate show`.

-- name: stages
-- The stages (of those that run over the row's table: ?) that marked a row (key ?) done or
-- failed, with the run and the error.
SELECT stage, state, error, run_id FROM stage_state
WHERE key = ? AND list_contains(?, stage) ORDER BY stage;
