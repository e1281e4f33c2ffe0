-- The run ledger (ultracurate.runner): every job's row in `runs`.

-- name: close_dead
-- The caller holds the catalog's write lock, so a run still marked running, other than the
-- runs this process holds open (?), has died (SIGKILL, power loss): close it; its committed
-- batches stand.
UPDATE runs SET state = 'killed', message = 'the process ended without closing the run'
WHERE state = 'running' AND NOT list_contains(?, run_id);

-- name: count_batch
-- One committed batch's rows, added to its run's counters.
UPDATE runs SET rows_done = rows_done + ?, rows_failed = rows_failed + ? WHERE run_id = ?;

-- name: last_recipe
-- The last run of a recipe (stage ?) with these steps (their digest ?): a rerun after an
-- unfinished one skips the steps it finished (rows_done, in order).
SELECT run_id, state, rows_done FROM runs
WHERE stage = ? AND json_extract_string(params, '$.digest') = ?
ORDER BY run_id DESC LIMIT 1;
