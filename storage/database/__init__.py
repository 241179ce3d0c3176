"""Database access: engines and migrations, the schema, and one module per kind of record (the ingest
manifest, the catalogue, the model registry, inference runs, their locks, pending videos, prediction writes,
partitions)."""
