-- The job a run was part of: a recipe's run (`ultracurate run RECIPE.toml`) is the parent of
-- the runs of its stages, so that a rerun of the recipe finds the stages it already finished.
ALTER TABLE runs ADD COLUMN parent_run BIGINT;
-- A digest of the options a stage's output depends on (e.g. classify-masks' thresholds): the
-- runner counts a row as done only when the run that finished it had the same digest.
ALTER TABLE runs ADD COLUMN resume_key VARCHAR;
