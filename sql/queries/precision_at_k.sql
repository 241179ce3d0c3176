-- precision@k of a model version's predictions against the ground truth: the share of each video's
-- top k labels that are true, averaged over the videos that have ground-truth labels.
-- k should not exceed the run's top_k (stored labels per video), or precision is understated.
-- The average of hits/k over N videos is all their hits / (k N): counted as two sums, not grouped by
-- video, so that no aggregate of a version's 6.1 M videos has to fit in memory (it grows linearly).
-- Parameters: model_version (integer), k (integer)
SELECT scored.videos,
       CAST(found.hits AS DOUBLE PRECISION) / (:k * NULLIF(scored.videos, 0)) AS precision_at_k
FROM (
    SELECT COUNT(*) AS videos
    FROM predictions p
    WHERE p.model_version = :model_version AND p.rank = 1
      AND EXISTS (SELECT 1 FROM video_labels t WHERE t.video_id = p.video_id)
) scored, (
    SELECT COUNT(*) AS hits
    FROM predictions p
    JOIN video_labels truth ON truth.video_id = p.video_id AND truth.label_id = p.label_id
    WHERE p.model_version = :model_version AND p.rank <= :k
) found;
