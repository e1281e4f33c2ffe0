-- Queries of the generate stage: planning candidates (ultracurate.stages.generate.plan_sql),
-- set-based, in three steps over temp tables. Placeholders in braces (filled by the caller,
-- never in a comment, where the replacement would land): edits (SQL giving the selected
-- edit_id), plan, classes and decided (the temp tables and relation of the steps before).
-- Parameters are named _ucp_* so that they never meet the user's --where parameters.

-- name: plan_edits
-- Step 1: each selected edit, the mode it is generated in (m: --mode, or the edit's own under
-- auto), its stored mask class, and why it is skipped before its mask class is looked at
-- (skip; NULL: not skipped so far): a caption over $_ucp_max_words words (words: split on
-- single spaces, as instruct counts them), or a region edit without a grounded mask.
SELECT edit_id, m, mask_class,
       CASE WHEN greatest(coalesce(len(string_split(source_caption, ' ')), 1),
                          coalesce(len(string_split(target_caption, ' ')), 1)) > $_ucp_max_words
            THEN 'caption over ' || $_ucp_max_words || ' words'
            WHEN m = 'region' AND (edit_status <> 'grounded' OR mask_rle IS NULL)
            THEN 'region edit without a mask (not grounded)' END AS skip
FROM (SELECT e.*, CASE WHEN $_ucp_mode = 'auto' THEN e.mode ELSE $_ucp_mode END AS m
      FROM edits e SEMI JOIN ({edits}) picked USING (edit_id)) e;

-- name: plan_unclassified
-- The region edits still planned whose mask has no stored class: their class comes from their
-- stored features (or their mask, when it has none) in Python (masks.classify_many).
SELECT e.edit_id, e.mask_rle, e.mask_height, e.mask_width, e.mask_area, e.mask_contours
FROM {plan} p JOIN edits e USING (edit_id)
WHERE p.m = 'region' AND p.skip IS NULL AND p.mask_class IS NULL
ORDER BY e.edit_id;

-- name: plan_decided
-- Step 2: every selected edit with its final skip reason: a region edit whose mask class
-- (stored, or computed: the classes relation) is not in $_ucp_classes is skipped when
-- $_ucp_by_class (--mask-class; a --where that reads mask_class decides by itself).
SELECT p.edit_id, p.m,
       coalesce(p.skip,
                CASE WHEN $_ucp_by_class AND p.m = 'region'
                          AND NOT list_contains($_ucp_classes,
                                                coalesce(p.mask_class, k.mask_class))
                     THEN 'mask class ' || coalesce(p.mask_class, k.mask_class)
                          || ' (region generation takes --mask-class '
                          || array_to_string($_ucp_classes, ',') || ')' END) AS skip
FROM {plan} p LEFT JOIN {classes} k USING (edit_id);

-- name: plan_summary
-- How many edits each reason skipped (reason NULL: planned), per mode, reasons in the order of
-- their first edit.
SELECT skip AS reason, m, count(*) AS n
FROM {decided} GROUP BY skip, m ORDER BY min(edit_id), m;

-- name: plan_skipped_edits
-- The edits one reason skipped.
SELECT edit_id FROM {decided} WHERE skip = $_ucp_reason ORDER BY edit_id;

-- name: plan_candidates
-- Step 3: the missing candidates 0..$_ucp_n-1 of every edit not skipped, as rows of
-- `candidates`.
-- Calls: the edits of one mode, in edit_id order, taken $_ucp_per_free (free-form) or
-- $_ucp_per_region (region) at a time (call_group), one call per candidate index. A plan
-- over windows of edits (ultracurate.stages.generate.PlanWindows) numbers a mode's edits on
-- from those of the windows before ($_ucp_from_free, $_ucp_from_region: their count) and takes
-- only the edits numbered below $_ucp_upto_free / $_ucp_upto_region (the rest, a call not
-- yet full, wait for the next window), so that a call is planned whole, in one INSERT, and
-- is the same call a plan in one go gives. Rows are numbered from $_ucp_first in the order
-- (candidate index, mode: free first, call_group, edit_id), so a call's rows are contiguous;
-- gen_call is the candidate_id of its first row.
-- Seeds (the one place they are derived): the first 16 hex digits (64 bits, big-endian) of
-- the MD5 of a key string, modulo 2^$_ucp_seed_bits. The key joins decimal integers and
-- words with ':': a seed per candidate (method): '<run seed>:<edit_id>:<candidate index>';
-- a seed per call ($_ucp_seed_per_call, ultraedit-compat):
-- '<run seed>:call:<mode>:<call_group>:<candidate index>'. Python:
-- int(hashlib.md5(key.encode()).hexdigest()[:16], 16) % 2 ** bits.
WITH numbered_edits AS (
    SELECT edit_id, m, (m = 'region')::INTEGER AS mode_order,
           CASE m WHEN 'free' THEN $_ucp_from_free ELSE $_ucp_from_region END
               + row_number() OVER (PARTITION BY m ORDER BY edit_id) - 1 AS ordinal
    FROM {decided} WHERE skip IS NULL),
planned AS (
    SELECT edit_id, m, mode_order,
           ordinal // CASE m WHEN 'free' THEN $_ucp_per_free ELSE $_ucp_per_region END
               AS call_group
    FROM numbered_edits
    WHERE ordinal < CASE m WHEN 'free' THEN $_ucp_upto_free ELSE $_ucp_upto_region END),
missing AS (
    SELECT p.*, k.range AS candidate_index
    FROM planned p CROSS JOIN range($_ucp_n) k
    ANTI JOIN candidates c ON c.edit_id = p.edit_id AND c.candidate_index = k.range),
numbered AS (
    SELECT *, $_ucp_first - 1 + row_number() OVER (ORDER BY candidate_index, mode_order,
                                                            call_group, edit_id) AS candidate_id
    FROM missing)
SELECT candidate_id, edit_id, candidate_index,
       ('0x' || md5(CASE WHEN $_ucp_seed_per_call
                         THEN concat_ws(':', $_ucp_seed, 'call', m, call_group, candidate_index)
                         ELSE concat_ws(':', $_ucp_seed, edit_id, candidate_index) END
                    )[1:16])::UBIGINT % (1::UBIGINT << $_ucp_seed_bits) AS seed,
       $_ucp_behaviour AS gen_behaviour,
       '{"mode": "' || m || '"}' AS gen_params,
       'planned' AS auto_status,
       $_ucp_at AS created_at,
       min(candidate_id) OVER (PARTITION BY candidate_index, mode_order, call_group) AS gen_call
FROM numbered;

-- name: plan_waiting
-- The edits of one mode the window decided to plan (and those waiting from before) past the
-- first $_ucp_skip of them: a call not yet full, which waits for the next window.
SELECT edit_id FROM {decided}
WHERE skip IS NULL AND m = $_ucp_m
ORDER BY edit_id OFFSET $_ucp_skip;
