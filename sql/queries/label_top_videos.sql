-- The videos the production model is most confident carry a label.
-- Parameters: label_id (integer), limit (integer)
SELECT video_id, score, rank
FROM production_labels
WHERE label_id = :label_id
ORDER BY score DESC, video_id
LIMIT :limit;
