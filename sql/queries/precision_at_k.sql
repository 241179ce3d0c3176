-- precision@k of a model version's predictions against the ground truth: the share of each video's
-- top k labels that are true, averaged over the videos that had ground-truth labels when scored.
-- k should not exceed the run's top_k (stored labels per video), or precision is understated.
-- The average of hits/k over N videos is all their hits / (k N); both sums are kept per version and rank
-- as nights publish (version_hits, storage/database/label_counts.py), so this reads at most top_k rows
-- whatever the version's size. The same from the version's rows themselves (a scan of them): the true
-- rows among ranks 1..k (hit) over k times the judged rows at rank 1 (hit IS NOT NULL).
-- Parameters: model_version (integer), k (integer)
SELECT COALESCE(SUM(CASE WHEN h.rank = 1 THEN h.judged END), 0) AS videos,
       CAST(SUM(CASE WHEN h.rank <= :k THEN h.hits END) AS DOUBLE PRECISION)
           / (:k * NULLIF(SUM(CASE WHEN h.rank = 1 THEN h.judged END), 0)) AS precision_at_k
FROM version_hits h
WHERE h.model_version = :model_version;
