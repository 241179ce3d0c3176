-- A video's top-k labels from the production model, with label names.
-- Parameters: video_id (text), k (integer, 1..3862)
SELECT rank, label_id, label_name, score, model_version
FROM production_labels
WHERE video_id = :video_id AND rank <= :k
ORDER BY rank;
