-- The generator call a candidate belongs to: the candidates rendered together in one model
-- call (for ultraedit-compat, one released call). Set when the candidate is planned, to the
-- candidate_id of the call's first row; the runner never splits a call across batches, so a
-- candidate's pixels do not depend on --batch-size or on where a killed run stopped.
ALTER TABLE candidates ADD COLUMN gen_call BIGINT;
