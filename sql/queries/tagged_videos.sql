-- A first look at the tags: videos with their top 3 labels from the production model.
-- Parameters: limit (integer, rows)
SELECT video_id, rank, label_id, label_name, score
FROM production_labels
WHERE rank <= 3
ORDER BY video_id, rank
LIMIT :limit;
