-- Queries of the UltraEdit import (ultracurate.importers.ultraedit).

-- name: rejected
-- The published rows (the runner's _uc_items: item, ident, source `<file>#<row>`) recorded
-- as rejects by an earlier import: the runner leaves them out unless --force.
SELECT i.item AS key FROM _uc_items i
WHERE i.source IN (SELECT source_path FROM ingest_rejects);
