"""Publishing a night's segment rows with its predictions.

A part writes its videos' segment rows chunk by chunk into a table of its own, in each chunk's transaction
beside its predictions (storage/database/prediction_writes.py, `write_chunk`, counted in
`inference_parts.segment_rows`). When the night publishes, each part's segment rows follow its predictions
(`Publishing.publish_part`, called by `prediction_writes.publish` in the same transaction): the videos the
night leaves out (changed since scored, or published by another night meanwhile) leave the part's segment
table too; the segments a published video had from earlier runs of the version are replaced; then one
sorted `INSERT ... SELECT` into the version's partition, checked against the part's counter.
"""

from sqlalchemy import Connection, delete, select, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table

from storage.database.partitions import SEGMENTS, ensure_partition, part_table_name
from storage.database.runs import RowsLost
from storage.database.schema import inference_parts, segment_predictions
from storage.formats.segment_rows import COLUMNS


class Publishing:
    """One publish's segment side: `present`, the run's part tables that exist (partitions.run_tables)."""

    def __init__(self, conn: Connection, run_id: int, model_version: int, present: set[str]):
        self.conn, self.run_id, self.model_version, self.present = conn, run_id, model_version, present
        self._partitioned = False

    def publish_part(self, part: int, left_out: list[str], published: str | None) -> int:
        """The part's segment rows into `segment_predictions`, less those of `left_out` videos; `published`:
        the part's prediction table as it is published (only the videos it publishes), whose videos' older
        segments go; None for a version's first night (the version has none). Returns the rows published."""
        table = part_table_name(self.model_version, self.run_id, part, SEGMENTS)
        if table not in self.present:
            return 0  # the night wrote no segments (or this part was published already)
        conn, rows = self.conn, sa_table(table, *(sa_column(c) for c in COLUMNS))
        removed = 0
        for start in range(0, len(left_out), 5000):
            removed += conn.execute(delete(rows).where(rows.c.video_id.in_(left_out[start : start + 5000]))).rowcount
        these = (inference_parts.c.run_id == self.run_id) & (inference_parts.c.part == part)
        if removed:
            conn.execute(
                update(inference_parts).where(these).values(segment_rows=inference_parts.c.segment_rows - removed)
            )
        if not self._partitioned:
            ensure_partition(conn, self.model_version, SEGMENTS)
            self._partitioned = True
        stored = segment_predictions.c
        if published is not None:
            videos = sa_table(published, sa_column("video_id"), sa_column("rank"))
            conn.execute(
                delete(segment_predictions).where(
                    stored.model_version == self.model_version,
                    stored.video_id.in_(select(videos.c.video_id).where(videos.c.rank == 1)),
                )
            )
        columns = ", ".join(COLUMNS)
        inserted = conn.exec_driver_sql(
            f"INSERT INTO segment_predictions ({columns}) SELECT {columns} FROM {table} ORDER BY video_id, rank"
        ).rowcount
        expected = conn.execute(select(inference_parts.c.segment_rows).where(these)).scalar()
        if inserted != expected:
            raise RowsLost(
                f"run {self.run_id} part {part}: {inserted} segment rows published where its counters say "
                f"{expected}; nothing of the night was published"
            )
        conn.exec_driver_sql(f"DROP TABLE {table}")
        return inserted
