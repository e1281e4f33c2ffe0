-- The run ledger (ultracurate.runner): every job's row in `runs`.

-- name: running
-- The runs marked running, with the process that runs each (ultracurate.procs decides which
-- of them are dead).
SELECT run_id, pid, host, proc_start, heartbeat_at FROM runs WHERE state = 'running';

-- name: close_dead
-- Runs whose process is gone (SIGKILL, power loss; the ids ?): closed as killed, ended at
-- their last commit; their committed batches stand.
UPDATE runs SET state = 'killed', message = 'the process ended without closing the run',
    ended_at = coalesce(heartbeat_at, started_at)
WHERE state = 'running' AND list_contains(?, run_id);

-- name: count_batch
-- One committed batch's rows, added to its run's counters, and the run's sign of life.
UPDATE runs SET rows_done = rows_done + ?, rows_failed = rows_failed + ?, heartbeat_at = ?
WHERE run_id = ?;

-- name: list
-- The runs, newest first, of the states $states (all when NULL), for `runs` (which tells a
-- running run whose process is gone as killed, and applies its --limit after that).
SELECT run_id, stage, state, rows_in, rows_done, rows_failed, started_at, ended_at,
    heartbeat_at, pid, host, proc_start, engine, parent_run, selection, params, message
FROM runs
WHERE $states IS NULL OR list_contains($states, state)
ORDER BY run_id DESC;

-- name: last_recipe
-- The last run of a recipe (stage ?) with these steps (their digest ?): a rerun after an
-- unfinished one skips the steps it finished (rows_done, in order).
SELECT run_id, state, rows_done FROM runs
WHERE stage = ? AND json_extract_string(params, '$.digest') = ?
ORDER BY run_id DESC LIMIT 1;

-- name: mark_done_update
-- Rows a stage finished set-based (their keys: the query {keys}) that it had marked before:
-- marked done by run ?, at ?, for stage ? (in place: the key's index is not touched).
UPDATE stage_state SET state = 'done', error = NULL, run_id = ?, updated_at = ?
FROM ({keys}) k
WHERE stage_state.stage = ? AND stage_state.key = k.key;

-- name: mark_done_insert
-- ... and those it had not: marks of stage ?, done by run ?, at ? (stage ? again).
INSERT INTO stage_state (stage, key, state, error, run_id, updated_at)
SELECT ?, k.key, 'done', NULL, ?, ?
FROM ({keys}) k ANTI JOIN (SELECT key FROM stage_state WHERE stage = ?) s ON s.key = k.key;
