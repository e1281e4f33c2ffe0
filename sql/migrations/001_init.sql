-- ultracurate catalog, schema version 1.
-- One row per real photo (anchors), per edit instruction (edits), per generated candidate pair
-- (candidates). Stage bookkeeping lives in stage_state; every job in runs.

CREATE TABLE IF NOT EXISTS schema_meta (
    key   VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);

CREATE TABLE runs (
    run_id        BIGINT PRIMARY KEY,
    stage         VARCHAR NOT NULL,
    params        JSON,                 -- the job's options
    selection     JSON,                 -- where / params / limit / sample / seed
    models        JSON,                 -- role -> checkpoint id or path, with library versions
    code_version  VARCHAR,
    engine        VARCHAR,
    started_at    TIMESTAMP NOT NULL,
    ended_at      TIMESTAMP,
    state         VARCHAR NOT NULL DEFAULT 'running',  -- running | completed | interrupted | failed
    rows_in       BIGINT DEFAULT 0,
    rows_done     BIGINT DEFAULT 0,
    rows_failed   BIGINT DEFAULT 0,
    message       VARCHAR
);

CREATE TABLE anchors (
    anchor_id     BIGINT PRIMARY KEY,
    sha256        VARCHAR NOT NULL UNIQUE,  -- of the original file bytes
    media         VARCHAR NOT NULL,          -- media store name of the original bytes
    source_path   VARCHAR,                   -- where it was ingested from
    dataset       VARCHAR,                   -- folder / coco / table / hf name
    width         INTEGER NOT NULL,          -- after EXIF orientation
    height        INTEGER NOT NULL,
    format        VARCHAR,                   -- PIL format of the original (JPEG, PNG, ...)
    orig_mode     VARCHAR,                   -- PIL mode of the original (RGB, CMYK, I;16, P, RGBA)
    conversion    VARCHAR,                   -- what load_rgb does to it, e.g. 'exif_transpose:6,cmyk->rgb'
    captions      VARCHAR[],
    external_id   VARCHAR,                   -- e.g. COCO image id
    ingest_run    BIGINT,
    ingested_at   TIMESTAMP,
    duplicate_of  BIGINT,                    -- near-duplicate of this anchor (dedup)
    dedup_run     BIGINT
);

-- Files an ingest could not use, with the reason; never half an anchor row.
CREATE TABLE ingest_rejects (
    source_path   VARCHAR NOT NULL,
    reason        VARCHAR NOT NULL,
    run_id        BIGINT,
    rejected_at   TIMESTAMP
);

CREATE TABLE edits (
    edit_id        BIGINT PRIMARY KEY,
    anchor_id      BIGINT NOT NULL,
    source_caption VARCHAR NOT NULL,
    instruction    VARCHAR NOT NULL,
    target_caption VARCHAR NOT NULL,
    edit_object    VARCHAR,                  -- phrase naming the region, 'NONE' for a global edit
    edit_type      VARCHAR NOT NULL CHECK (edit_type IN ('add', 'change_global', 'change_local',
                       'change_color', 'transform_global', 'transform_local', 'replace', 'turn',
                       'others')),
    mode           VARCHAR NOT NULL CHECK (mode IN ('free', 'region')),
    edit_status    VARCHAR NOT NULL DEFAULT 'proposed',  -- proposed | grounded | no_region | dropped | invalid (instruct: answer failed validation, reasons in edit_reasons)
    edit_reasons   VARCHAR[],
    -- provenance of the instruction
    instruct_backend   VARCHAR,
    instruct_model     VARCHAR,
    prompt_version     VARCHAR,
    exemplar_ids       VARCHAR[],
    instruct_seed      BIGINT,
    instruct_run       BIGINT,
    external_id        VARCHAR,              -- e.g. UltraEdit global_idx
    -- region mask (COCO RLE, compressed counts string) and its features
    mask_rle        VARCHAR,
    mask_height     INTEGER,
    mask_width      INTEGER,
    mask_area       DOUBLE,                  -- fraction of the image
    mask_bbox       INTEGER[],               -- x, y, w, h in pixels
    mask_components INTEGER,
    mask_contours   INTEGER,                 -- external contours
    mask_class      VARCHAR,                 -- too_large | too_small | fragmented | fine
    ground_boxes    JSON,                    -- detector boxes, scores, labels
    ground_run      BIGINT,
    classify_run    BIGINT,
    created_at      TIMESTAMP
);

CREATE TABLE candidates (
    candidate_id     BIGINT PRIMARY KEY,
    edit_id          BIGINT NOT NULL,
    candidate_index  INTEGER NOT NULL,
    seed             BIGINT NOT NULL,
    gen_behaviour    VARCHAR,                -- method | ultraedit-compat
    gen_params       JSON,                   -- every sampled parameter
    source_image     VARCHAR,                -- media name
    source_is_anchor BOOLEAN,                -- true: the real photo kept as source
    edited_image     VARCHAR,                -- media name
    gen_run          BIGINT,
    clip_sim_source  DOUBLE,
    clip_sim_target  DOUBLE,
    clip_sim_dir     DOUBLE,
    clip_sim_image   DOUBLE,
    dinov2_sim       DOUBLE,
    ssim             DOUBLE,
    l1               DOUBLE,
    l2               DOUBLE,
    score_run        BIGINT,
    auto_status      VARCHAR NOT NULL DEFAULT 'planned',  -- planned | generated | scored | accepted | rejected | failed
    reject_reasons   VARCHAR[],
    filter_run       BIGINT,
    human_decision   VARCHAR,                -- accept | reject | NULL
    human_tags       VARCHAR[],
    reviewer         VARCHAR,
    decided_at       TIMESTAMP,
    selected         BOOLEAN,                -- chosen by balance
    balance_run      BIGINT,
    duplicate_of     BIGINT,
    dedup_run        BIGINT,
    error            VARCHAR,
    created_at       TIMESTAMP,
    UNIQUE (edit_id, candidate_index)
);

-- Which rows each stage has finished (or failed) and in which run: the runner's resume state.
CREATE TABLE stage_state (
    stage   VARCHAR NOT NULL,
    key     BIGINT NOT NULL,
    state   VARCHAR NOT NULL,   -- done | failed
    error   VARCHAR,
    run_id  BIGINT,
    updated_at TIMESTAMP,
    PRIMARY KEY (stage, key)
);
