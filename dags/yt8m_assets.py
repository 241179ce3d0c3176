"""Assets shared between the YouTube-8M DAGs (no DAG here)."""

from airflow.sdk import Asset

# Updated by yt8m_ingest whenever new Parquet lands; the event's extra says where and which shards.
YT8M_PARQUET = Asset(name="yt8m_parquet", uri="x-vtag://yt8m/parquet")
