"""Pieces of the trigger forms' JSON schemas shared between the YouTube-8M DAGs (no DAG here)."""

# A location in the form: empty (the Airflow variable), an absolute path, a file:/// or an s3:// URI (a bucket,
# then a key), without control characters. A relative path would depend on the worker's working folder.
URI_PATTERN = r"^(?![\s\S]*[\x00-\x1f])(|/.*|file:///.*|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?)$"
