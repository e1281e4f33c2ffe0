-- ultracurate catalog, schema version 2: every caption kept, one row each.
-- A caption list column rewrote whole anchor rows on every change (slow at millions of
-- anchors); a narrow table takes appends instead. anchors_v keeps a `captions` list (and
-- `caption_sources` beside it) for --where users.

CREATE TABLE anchor_captions (
    anchor_id      BIGINT NOT NULL,
    caption_index  INTEGER NOT NULL,      -- order of arrival within the anchor, from 0
    caption        VARCHAR NOT NULL,      -- whitespace-normalised; unique per anchor
    source         VARCHAR NOT NULL,      -- ingest | coco | import:<format> | ultraedit | caption:<model>
    model          VARCHAR,               -- captioner: hub id, folder or served model name
    prompt         VARCHAR,               -- captioner: prompt version (and decoding grammar)
    run_id         BIGINT,                -- the ingest or caption run that added it
    invalid_reason VARCHAR,               -- a captioner answer that failed validation: kept, never used
    created_at     TIMESTAMP,
    PRIMARY KEY (anchor_id, caption_index)
);

-- A file with the same bytes as an anchor: which one (its captions were merged into it).
ALTER TABLE ingest_rejects ADD COLUMN duplicate_of BIGINT;

-- Existing captions, in list order, de-duplicated per anchor.
INSERT INTO anchor_captions (anchor_id, caption_index, caption, source, run_id, created_at)
SELECT anchor_id, (row_number() OVER (PARTITION BY anchor_id ORDER BY i) - 1)::INTEGER,
       caption, source, ingest_run, ingested_at
FROM (
    SELECT anchor_id, caption, i, ingest_run, ingested_at,
           CASE WHEN dataset = 'coco' THEN 'coco'
                WHEN dataset LIKE 'ultraedit:%' THEN 'ultraedit'
                WHEN dataset LIKE 'import-%' THEN 'import:' || substr(dataset, 8)
                ELSE 'ingest' END AS source
    FROM (SELECT anchor_id, dataset, ingest_run, ingested_at,
                 trim(regexp_replace(unnest(captions), '\s+', ' ', 'g')) AS caption,
                 generate_subscripts(captions, 1) AS i
          FROM anchors WHERE captions IS NOT NULL)
    WHERE caption <> ''
    QUALIFY row_number() OVER (PARTITION BY anchor_id, caption ORDER BY i) = 1
);

ALTER TABLE anchors DROP COLUMN captions;
