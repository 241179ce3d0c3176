"""Object store, TFRecord, Parquet and database access."""
