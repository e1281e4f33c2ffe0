-- Where a run's rows were computed (the Ray engine): replicas asked for, batches per node id,
-- replicas lost and batches resubmitted, the per-replica resources. NULL for local runs.
ALTER TABLE runs ADD COLUMN workers JSON;
