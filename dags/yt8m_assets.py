"""Assets shared between the YouTube-8M DAGs (no DAG here)."""

from airflow.sdk import Asset

# Updated by yt8m_ingest whenever new Parquet lands; the event's extra says where (`dest`), how many shards
# and rows, and the first 100 Parquet files (`outputs`: capped, so the event stays small at 11,532 shards).
YT8M_PARQUET = Asset(name="yt8m_parquet", uri="x-vtag://yt8m/parquet")
