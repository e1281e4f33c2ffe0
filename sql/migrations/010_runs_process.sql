-- Jobs run beside each other (a job holds the catalog only for each batch's commit), so a run
-- marked running may belong to a live process: the ledger records which process runs it
-- (host, pid and the pid's start time, see ultracurate.procs) and when it last committed.
-- A run is closed as killed only once that process is gone.
ALTER TABLE runs ADD COLUMN pid BIGINT;
ALTER TABLE runs ADD COLUMN host VARCHAR;
ALTER TABLE runs ADD COLUMN proc_start VARCHAR;
ALTER TABLE runs ADD COLUMN heartbeat_at TIMESTAMP;
