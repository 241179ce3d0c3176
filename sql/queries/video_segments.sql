-- Where in a video the production model places its labels: the video's best 5-second segments, best
-- first, each with the second it starts at and ends before, the label and its name, and the score.
-- Parameters: video_id (text)
SELECT s.rank, s.start_second, s.start_second + 5 AS end_second, s.label_id, l.name AS label_name, s.score,
       s.model_version
FROM segment_predictions s
JOIN production_versions v ON v.version = s.model_version AND v.level = 'frame'
LEFT JOIN labels l ON l.label_id = s.label_id
WHERE s.video_id = :video_id
ORDER BY s.rank;
