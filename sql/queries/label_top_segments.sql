-- The 5-second segments the production frame-level model is most confident show a label: the video, the
-- second the segment starts at and ends before, the score, and the label's name. One ordered read of the
-- label index of the model's partition: `limit` entries however common the label.
-- Parameters: label_id (integer), limit (integer)
SELECT s.video_id, s.start_second, s.start_second + 5 AS end_second, s.score, s.label_id, l.name AS label_name
FROM segment_predictions s
LEFT JOIN labels l ON l.label_id = s.label_id
WHERE s.model_version = (SELECT version FROM production_versions WHERE level = 'frame')
  AND s.label_id = :label_id
ORDER BY s.score DESC, s.video_id, s.start_second
LIMIT :limit;
