-- ultracurate catalog, schema version 7: multi-turn edit chains, and a vision-language judge.

-- A judge's verdict on a candidate pair (`ultracurate judge`): three 1-5 scores and a short
-- rationale, with the model and prompt version that gave them and the run. An answer that
-- failed validation after its tries leaves the scores NULL and says why.
ALTER TABLE candidates ADD COLUMN judge_instruction INTEGER;    -- follows the instruction
ALTER TABLE candidates ADD COLUMN judge_preservation INTEGER;   -- keeps what it should not change
ALTER TABLE candidates ADD COLUMN judge_quality INTEGER;        -- looks like a real photo
ALTER TABLE candidates ADD COLUMN judge_rationale VARCHAR;
ALTER TABLE candidates ADD COLUMN judge_model VARCHAR;          -- hub id, folder or served model name
ALTER TABLE candidates ADD COLUMN judge_prompt VARCHAR;         -- prompt version (and decoding grammar)
ALTER TABLE candidates ADD COLUMN judge_invalid_reason VARCHAR; -- why the last answer was unusable
ALTER TABLE candidates ADD COLUMN judge_run BIGINT;

-- Lineage of an anchor made by `ultracurate chain`: the edited image of an accepted candidate
-- (parent_candidate_id) is the source of turn `turn` (2, 3, ...) of session `session_id`.
-- NULL on photos.
ALTER TABLE anchors ADD COLUMN parent_candidate_id BIGINT;
ALTER TABLE anchors ADD COLUMN session_id BIGINT;
ALTER TABLE anchors ADD COLUMN turn INTEGER;

-- A multi-turn session: turn 1 is an accepted candidate on a photo (root_candidate_id), each
-- later turn an accepted candidate edited from the previous turn's edited image. It ends at the
-- first turn that yields no accepted candidate (ended_turn, end_reason); NULL while it can go on.
CREATE TABLE sessions (
    session_id        BIGINT PRIMARY KEY,
    root_candidate_id BIGINT NOT NULL UNIQUE,
    root_anchor_id    BIGINT NOT NULL,
    ended_turn        INTEGER,
    end_reason        VARCHAR,
    chain_run         BIGINT,
    created_at        TIMESTAMP
);

-- The candidate each turn of a session continues with (one per turn, one session per candidate).
CREATE TABLE session_turns (
    session_id   BIGINT NOT NULL,
    turn         INTEGER NOT NULL,      -- 1, 2, ...
    candidate_id BIGINT NOT NULL UNIQUE,
    chain_run    BIGINT,
    created_at   TIMESTAMP,
    PRIMARY KEY (session_id, turn)
);
