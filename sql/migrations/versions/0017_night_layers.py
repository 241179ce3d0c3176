"""A later night's predictions published as a layer of their own.

`predictions.layer`: the run whose night's table holds the row: a later night's rows are published as a
table of their own (its layer) until they are merged into the version's base, which holds its first night's
rows (their run) and those merged or written without a night (0; here, the rows of before). Inserting a normal night's
1.2 M rows at random places of a version's 12 GB of indexes ran at 52,000-73,000 rows/s at YouTube-8M's
size; a night's rows indexed apart (sorted builds) and attached run several times faster. On PostgreSQL:

- each version's partition `predictions_v<N>` becomes a table partitioned by LIST (layer), its rows until
  now its base `predictions_v<N>_base` (layer 0); a later night attaches `predictions_v<N>_night<run>` and
  `storage/database/partitions.py` `merge_layers` moves the nights into the base off the night's path;
- the primary key takes `layer` (a partitioned table's unique keys must hold its partitioning columns):
  one video's rank appears once across the layers because a night's publish first removes the rows it
  replaces and leaves the videos another night holds, under the publish lock.

Cost on an existing database: the primary key rebuilt on every partition (a sorted build: about 3 minutes
for 120 M rows) and one scan of each version's rows to prove `layer = 0`. Run between nights: a part table
of a night in flight is given the column, its rows its run's layer.

SQLite gets the column (0 there) and keeps its primary key: it has no partitions.

Revision ID: 0017
Revises: 0016
"""

import re

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

COLUMNS = "video_id, model_version, rank, label_id, score, run_id, hit"


def _relations(pattern: str, kind: str = "r") -> list[str]:
    names = op.get_bind().exec_driver_sql(
        "SELECT relname FROM pg_class WHERE relkind = %s AND relnamespace = current_schema()::regnamespace",
        (kind,),
    )
    return sorted(name for (name,) in names if re.fullmatch(pattern, name))


def upgrade() -> None:
    op.add_column("predictions", sa.Column("layer", sa.Integer, nullable=False, server_default="0"))
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _relations(r"predictions_v\d+_run\d+(_part\d+)?"):  # a night in flight: LIKE predictions before
        run = int(re.fullmatch(r"predictions_v\d+_run(\d+)(_part\d+)?", table).group(1))
        op.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS layer integer NOT NULL DEFAULT {run}")
    op.execute("ALTER TABLE predictions DROP CONSTRAINT predictions_pkey")
    op.execute("ALTER TABLE predictions ADD PRIMARY KEY (video_id, model_version, rank, layer)")
    for partition in _relations(r"predictions_v\d+"):
        version = int(partition[len("predictions_v") :])
        base = f"{partition}_base"
        op.execute(f"ALTER TABLE predictions DETACH PARTITION {partition}")
        op.execute(f"ALTER TABLE {partition} RENAME TO {base}")
        op.execute(f"ALTER TABLE {base} ADD CHECK (model_version = {version}), ADD CHECK (layer = 0)")
        op.execute(f"CREATE TABLE {partition} (LIKE predictions INCLUDING DEFAULTS) PARTITION BY LIST (layer)")
        op.execute(f"ALTER TABLE {partition} ATTACH PARTITION {base} FOR VALUES IN (0)")
        op.execute(f"ALTER TABLE predictions ATTACH PARTITION {partition} FOR VALUES IN ({version})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for partition in _relations(r"predictions_v\d+", kind="p"):
            version, base = int(partition[len("predictions_v") :]), f"{partition}_base"
            for layer in _relations(rf"{partition}_night\d+"):
                op.execute(f"INSERT INTO {base} ({COLUMNS}) SELECT {COLUMNS} FROM {layer} ORDER BY video_id, rank")
                op.execute(f"DROP TABLE {layer}")
            op.execute(f"ALTER TABLE {partition} DETACH PARTITION {base}")
            op.execute(f"DROP TABLE {partition}")
            op.execute(f"ALTER TABLE {base} RENAME TO {partition}")
            op.execute(f"ALTER TABLE predictions ATTACH PARTITION {partition} FOR VALUES IN ({version})")
        op.execute("ALTER TABLE predictions DROP CONSTRAINT predictions_pkey")
        op.execute("ALTER TABLE predictions ADD PRIMARY KEY (video_id, model_version, rank)")
    op.drop_column("predictions", "layer")
