-- Videos whose top label differs between two model versions (both must have scored the video).
-- Parameters: old_version (integer), new_version (integer)
SELECT a.video_id,
       a.label_id AS old_label_id, la.name AS old_label, a.score AS old_score,
       b.label_id AS new_label_id, lb.name AS new_label, b.score AS new_score
FROM predictions a
JOIN predictions b ON b.video_id = a.video_id AND b.model_version = :new_version AND b.rank = 1
LEFT JOIN labels la ON la.label_id = a.label_id
LEFT JOIN labels lb ON lb.label_id = b.label_id
WHERE a.model_version = :old_version AND a.rank = 1 AND a.label_id <> b.label_id
ORDER BY a.video_id;
