-- How many videos got each label among their top k in one night's inference run, as the run's parts
-- counted them while scoring (a part counts once it succeeded), so a night of 6.1 M videos sums a
-- few thousand rows instead of 122 M.
-- Parameters: run_id (integer, see the runs query), k (integer), limit (integer)
SELECT c.label_id, l.name AS label_name, SUM(c.videos) AS videos
FROM inference_label_counts c
LEFT JOIN labels l ON l.label_id = c.label_id
WHERE c.run_id = :run_id AND c.rank <= :k
GROUP BY c.label_id, l.name
ORDER BY videos DESC, c.label_id
LIMIT :limit;
