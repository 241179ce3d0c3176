-- The videos the production model is most confident carry a label.
-- One ordered index read per level's production model (its partition on PostgreSQL), then merged:
-- `limit` index entries however common the label, where the production_labels view would sort them all.
-- Parameters: label_id (integer), limit (integer)
SELECT video_id, score, rank FROM (
    SELECT * FROM (
        SELECT p.video_id, p.score, p.rank FROM predictions p
        WHERE p.model_version = (SELECT version FROM production_versions WHERE level = 'frame')
          AND p.label_id = :label_id
        ORDER BY p.score DESC, p.video_id LIMIT :limit
    ) frame_level
    UNION ALL
    SELECT * FROM (
        SELECT p.video_id, p.score, p.rank FROM predictions p
        WHERE p.model_version = (SELECT version FROM production_versions WHERE level = 'video')
          AND p.label_id = :label_id
        ORDER BY p.score DESC, p.video_id LIMIT :limit
    ) video_level
) best
ORDER BY score DESC, video_id
LIMIT :limit;
