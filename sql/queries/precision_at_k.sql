-- precision@k of a model version's predictions against the ground truth: the share of each video's
-- top k labels that are true, averaged over the videos that have ground-truth labels.
-- k should not exceed the run's top_k (stored labels per video), or precision is understated.
-- Parameters: model_version (integer), k (integer)
SELECT COUNT(*) AS videos, AVG(CAST(hits AS DOUBLE PRECISION) / :k) AS precision_at_k
FROM (
    SELECT p.video_id, SUM(CASE WHEN truth.label_id IS NULL THEN 0 ELSE 1 END) AS hits
    FROM predictions p
    LEFT JOIN video_labels truth ON truth.video_id = p.video_id AND truth.label_id = p.label_id
    WHERE p.model_version = :model_version AND p.rank <= :k
      AND EXISTS (SELECT 1 FROM video_labels t WHERE t.video_id = p.video_id)
    GROUP BY p.video_id
) per_video;
