"""The yt8m_ingest DAG: wiring only. Its documentation (shown in the Airflow UI) is the DAG function's docstring."""

import pendulum
import yt8m_params as form
from airflow.sdk import dag, task
from yt8m_assets import YT8M_PARQUET

from tasks.settings import schedule  # no heavy imports

# Names a batch in the UI by its first and last shard, e.g. "train0000.tfrecord .. train0011.tfrecord (12 shards)".
_BATCH_NAME = (
    "{% set batch = task.op_kwargs['batch'] %}"
    "{% set first = batch[0]['uri'].rsplit('/', 1)[-1] %}{% set last = batch[-1]['uri'].rsplit('/', 1)[-1] %}"
    "{% if batch | length == 1 %}{{ first }}{% else %}{{ first }} .. {{ last }} ({{ batch | length }} shards){% endif %}"
)


def _shards(batch: list[dict]) -> list:
    """The ObjectInfo of each shard of a batch as list_pending_shards passed it on."""
    from storage.objectstore import ObjectInfo

    return [ObjectInfo(shard["uri"], shard["size"], shard["fingerprint"]) for shard in batch]


@dag(
    dag_id="yt8m_ingest",
    schedule=schedule("VTAG_INGEST_CRON", "0 1 * * *"),  # before the nightly inference at 02:00
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["yt8m"],
    params={
        "src": form.location(
            "Source URI", "Folder of TFRecord shards (path, file:// or s3://). Empty: the yt8m_raw_uri variable."
        ),
        "dest": form.location("Destination URI", "Root of the Parquet layout. Empty: the yt8m_parquet_uri variable."),
        "pattern": form.file_pattern("*.tfrecord", "File pattern", "Glob on shard names."),
        "force": form.flag("Force", "Convert again even unchanged shards."),
        "replace": form.flag(
            "Replace",
            "Let a shard replace the Parquet file that a shard of the same name from another "
            "source was converted to (otherwise it is quarantined).",
        ),
    },
)
def yt8m_ingest():
    """Convert YouTube-8M TFRecord shards into the Parquet layout, one mapped task per batch of shards,
    and tell training by updating the `yt8m_parquet` asset. The work lives in `tasks/ingest.py`.

    **When**: daily at `$VTAG_INGEST_CRON` (default 01:00 UTC, before the nightly inference; empty:
    manual runs only), no catchup: each run converts whatever is pending. One run at a time.

    **Params**: `src` (folder of shards; empty: the `yt8m_raw_uri` variable), `dest` (Parquet root;
    empty: the `yt8m_parquet_uri` variable), `pattern` (glob on shard names), `force` (convert again
    even unchanged shards), `replace` (let a shard replace the Parquet file that a same-named shard from
    another source was converted to; otherwise it is quarantined).

    **Reads** the shards under `src` and the ingest manifest (`ingested_shards` in the `yt8m_db`
    database). **Writes** `<dest>/<level>/<split>/<shard>.parquet`, per shard a manifest row and its
    videos' catalogue rows (`videos`, `video_labels`), and an asset event with extra `dest`, `shards`
    (count), `rows` and `outputs` (the first 100 Parquet URIs).

    **Tasks**: `list_pending_shards` cuts the pending shards, in name order, into at most
    `tasks.ingest.MAX_BATCHES` contiguous batches (one shard each while there are fewer), since
    Airflow maps at most 1,024 tasks and a YouTube-8M split has 3,844 shards; `convert_batch` converts
    each batch; `publish_asset` updates the asset from what converted, failed batches included;
    `all_shards_converted` then fails the run when any batch failed, so that a quarantine is seen.

    **Failures and reruns**: a shard with bad content is quarantined in the manifest and its batch's
    other shards still convert; the batch then fails without retries, naming each bad shard. A
    transient failure (store, disk, database) fails the batch with retries, and a retry converts only
    the shards not converted yet. A rerun (or a new manual run) converts only what is still pending or
    changed, so rerunning is always safe; `force` converts everything matching `pattern` again. To
    backfill older shards, drop them into `src` (or trigger with `src` and `pattern`): there is nothing
    per date to backfill.
    """

    @task
    def list_pending_shards(params: dict) -> list[list[dict]]:
        """Cut the shards not converted yet (or changed) into contiguous batches, one mapped
        `convert_batch` each."""
        from airflow_glue import config as cfg
        from storage.objectstore import canonical_uri
        from tasks.ingest import list_pending, plan_batches

        # Canonical here, so that the batches, the manifest and the asset event all spell dest one way.
        src, dest = canonical_uri(cfg.raw_uri(params["src"])), canonical_uri(cfg.parquet_uri(params["dest"]))
        pending, skipped = list_pending(src, dest, cfg.db_url(), params["pattern"], params["force"], cfg.s3_config())
        batches = plan_batches(pending)
        print(
            f"{len(pending)} shards to convert from {src} to {dest} in {len(batches)} batches, {skipped} already converted"
        )
        return [
            [{"uri": s.uri, "size": s.size, "fingerprint": s.fingerprint, "dest": dest} for s in batch]
            for batch in batches
        ]

    @task(max_active_tis_per_dagrun=4, retries=2, map_index_template=_BATCH_NAME)
    def convert_batch(batch: list[dict], params: dict) -> dict:
        """Convert a batch's shards one by one into Parquet, a log line each; fails naming the shards
        quarantined (no retry) or not converted for a transient reason (retried: the retry converts
        only those)."""
        from airflow.sdk.exceptions import AirflowFailException

        from airflow_glue import config as cfg
        from tasks import ingest

        report = ingest.convert_batch(
            _shards(batch),
            batch[0]["dest"],
            cfg.db_url(),
            cfg.s3_config(),
            force=params["force"],
            replace=params["replace"],
        )
        print(f"{len(report.converted)} converted, {report.skipped} already converted, {len(report.failed)} failed")
        failures = "\n".join(report.failed.values())
        if report.retryable:  # Airflow retries the batch; the retry skips the shards converted by now
            raise ingest.TransientBatchError(
                f"{len(report.failed)} of {len(batch)} shards did not convert:\n{failures}"
            )
        if report.failed:  # bad content: retrying cannot help
            raise AirflowFailException(f"quarantined {len(report.failed)} of {len(batch)} shards:\n{failures}")
        return {"converted": len(report.converted), "rows": sum(r["rows"] for r in report.converted)}

    @task(outlets=[YT8M_PARQUET], trigger_rule="all_done")
    def publish_asset(batches: list[list[dict]], outlet_events=None) -> int:
        """Update the `yt8m_parquet` asset with what converted (read from the manifest), even when some
        batch failed; skipped when nothing did, so that training does not start for nothing."""
        from airflow.sdk.exceptions import AirflowSkipException

        from airflow_glue import config as cfg
        from tasks.ingest import summary

        planned = [shard for batch in batches for shard in _shards(batch)]
        done = summary(planned, batches[0][0]["dest"], cfg.db_url(), cfg.s3_config()) if planned else None
        if not done or not done["shards"]:
            raise AirflowSkipException("no shard was converted: nothing new for training")
        outlet_events[YT8M_PARQUET].extra = done
        print(f"published {done['shards']} of {len(planned)} planned shards ({done['rows']} videos) in {done['dest']}")
        return done["shards"]

    @task
    def all_shards_converted(results: list[dict]) -> None:
        """Leaf that fails the run when a batch failed, since publish_asset succeeds on partial success."""

    batches = list_pending_shards()
    # A mapped task's doc is its doc_md argument alone (Airflow skips the docstring there): pass it on.
    results = convert_batch.override(doc_md=convert_batch.function.__doc__).expand(batch=batches)
    results >> publish_asset(batches)
    all_shards_converted(results)


yt8m_ingest()
