"""The project's tables as SQLAlchemy Core metadata. Migrations in sql/migrations create them."""

from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, Text, UniqueConstraint

metadata = MetaData()

ingested_shards = Table(
    "ingested_shards",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source_uri", String(1024), nullable=False),
    Column("dest_uri", String(1024), nullable=False),
    Column("output_uri", String(1024)),
    Column("level", String(8)),
    Column("split", String(16)),
    Column("size_bytes", BigInteger, nullable=False),
    Column("fingerprint", String(256), nullable=False),
    Column("checksum", String(64)),
    Column("rows", Integer),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("error_record", Integer),
    Column("error_offset", BigInteger),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    UniqueConstraint("source_uri", "dest_uri", name="uq_ingested_shards_source_dest"),
)
