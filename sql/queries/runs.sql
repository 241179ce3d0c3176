-- The latest inference runs: which model scored how many videos for which logical date.
-- Parameters: limit (integer)
SELECT run_id, logical_date, model_version, top_k, status, videos_total, videos_done, rows_written, finished_at
FROM inference_runs
ORDER BY logical_date DESC, run_id DESC
LIMIT :limit;
