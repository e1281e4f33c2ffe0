-- The bytes a reject was made of (sha256; NULL when they could not be read), so that a rerun
-- over the same bytes records nothing new and a changed file is not taken for the old one.
ALTER TABLE ingest_rejects ADD COLUMN sha256 VARCHAR;
