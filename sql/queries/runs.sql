-- The run ledger (ultracurate.runner): every job's row in `runs`.

-- name: close_dead
-- The caller holds the catalog's write lock, so a run still marked running has died (SIGKILL,
-- power loss): close it; its committed batches stand.
UPDATE runs SET state = 'killed', message = 'the process ended without closing the run'
WHERE state = 'running';

-- name: count_batch
-- One committed batch's rows, added to its run's counters.
UPDATE runs SET rows_done = rows_done + ?, rows_failed = rows_failed + ? WHERE run_id = ?;
