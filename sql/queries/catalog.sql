-- The catalog's own bookkeeping (ultracurate.catalog.Catalog): schema checks at open, the
-- migrations' records, and the declared columns the table API casts to.

-- name: meta
SELECT value FROM schema_meta WHERE key = ?;

-- name: set_meta
INSERT OR REPLACE INTO schema_meta VALUES (?, ?);

-- name: schema_columns
-- Every table's columns and types, in order: what the schema checksum is taken over.
SELECT table_name, column_index, column_name, data_type FROM duckdb_columns()
WHERE database_name = current_database() AND schema_name = 'main'
  AND table_name IN (SELECT table_name FROM duckdb_tables()
                     WHERE database_name = current_database() AND schema_name = 'main')
ORDER BY table_name, column_index;

-- name: columns
-- One table's columns and the types DuckDB declares for them (the table API casts to these).
SELECT column_name, data_type FROM duckdb_columns()
WHERE database_name = current_database() AND schema_name = 'main' AND table_name = ?
ORDER BY column_index;

-- name: block_size
SELECT block_size FROM pragma_database_size() WHERE database_name = current_database();

-- name: tables
SELECT table_name FROM duckdb_tables()
WHERE database_name = current_database() AND schema_name = 'main' ORDER BY table_name;

-- name: last_metadata_block
-- The last block DuckDB keeps its metadata (tables, row groups, free list) in.
SELECT max(block_id) FROM pragma_metadata_info();

-- name: last_data_block
-- The last block one table's stored rows are in, from DuckDB's storage info (metadata only: no
-- row is read). {table} is the table's name as a string literal.
SELECT max(greatest(block_id, coalesce(list_max(additional_block_ids), -1)))
FROM pragma_storage_info({table}) WHERE persistent;

-- name: views
SELECT view_name FROM duckdb_views() WHERE database_name = current_database() AND NOT internal;
