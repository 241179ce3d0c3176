-- How many videos got each label among their top k in one night's inference run.
-- Parameters: run_id (integer, see the runs query), k (integer), limit (integer)
SELECT p.label_id, l.name AS label_name, COUNT(*) AS videos
FROM predictions p
LEFT JOIN labels l ON l.label_id = p.label_id
WHERE p.run_id = :run_id AND p.rank <= :k
GROUP BY p.label_id, l.name
ORDER BY videos DESC, p.label_id
LIMIT :limit;
