"""Ingest YouTube-8M TFRecord shards into the Parquet layout, one mapped task per pending shard.

The work lives in tasks/ingest.py; this file only wires it. A shard with bad content fails its own
mapped task (without retries) and is quarantined in the manifest; the others still convert, and the
yt8m_parquet asset is updated with the shards that did.
"""

import os

import pendulum
from airflow.sdk import Param, dag, task
from yt8m_assets import YT8M_PARQUET
from yt8m_params import URI_PATTERN


@dag(
    dag_id="yt8m_ingest",
    schedule=os.environ.get("VTAG_INGEST_CRON", "0 1 * * *") or None,  # before the nightly inference at 02:00
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["yt8m"],
    params={
        "src": Param(None, type=["null", "string"], pattern=URI_PATTERN, title="Source URI",
                     description="Folder of TFRecord shards (path, file:// or s3://). Empty: the yt8m_raw_uri variable."),
        "dest": Param(None, type=["null", "string"], pattern=URI_PATTERN, title="Destination URI",
                      description="Root of the Parquet layout. Empty: the yt8m_parquet_uri variable."),
        "pattern": Param("*.tfrecord", type="string", minLength=1, title="File pattern", description="Glob on shard names."),
        "force": Param(False, type="boolean", title="Force", description="Convert again even unchanged shards."),
    },
)
def yt8m_ingest():
    @task
    def list_pending_shards(params: dict) -> list[dict]:
        from tasks import airflow_config as cfg
        from tasks.ingest import list_pending

        src, dest = cfg.raw_uri(params["src"]), cfg.parquet_uri(params["dest"])
        pending, skipped = list_pending(src, dest, cfg.db_url(), params["pattern"], params["force"], cfg.s3_config())
        print(f"{len(pending)} shards to convert from {src} to {dest}, {skipped} already converted")
        return [{"uri": s.uri, "size": s.size, "fingerprint": s.fingerprint, "dest": dest} for s in pending]

    @task(max_active_tis_per_dagrun=4, retries=2, map_index_template="{{ task.op_kwargs['shard']['uri'] }}")
    def convert_shard(shard: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from storage.objectstore import ObjectInfo
        from tasks import airflow_config as cfg
        from tasks.ingest import ShardFailedError, convert_shard

        try:
            source = ObjectInfo(shard["uri"], shard["size"], shard["fingerprint"])
            return {**convert_shard(source, shard["dest"], cfg.db_url(), cfg.s3_config()), "dest": shard["dest"]}
        except ShardFailedError as exc:
            raise AirflowFailException(f"quarantined: {exc}") from None  # bad content: retrying cannot help

    @task(outlets=[YT8M_PARQUET], trigger_rule="all_done")
    def publish_asset(results: list[dict], outlet_events=None) -> int:
        from airflow.sdk.exceptions import AirflowSkipException

        converted = [r for r in results if r]
        if not converted:
            raise AirflowSkipException("no shard was converted: nothing new for training")
        outlet_events[YT8M_PARQUET].extra = {
            "dest": converted[0]["dest"],
            "outputs": [r["output_uri"] for r in converted],
            "rows": sum(r["rows"] for r in converted),
        }
        return len(converted)

    @task
    def all_shards_converted(results: list[dict]) -> None:
        """Leaf that fails the run when a shard failed, since publish_asset succeeds on partial success."""

    results = convert_shard.expand(shard=list_pending_shards())
    publish_asset(results)
    all_shards_converted(results)


yt8m_ingest()
