"""File formats: TFRecord framing, tf.Example, YouTube-8M records and their spec, the Parquet layout, the night's exports.

No database access here; reading and writing go through storage.objectstore."""
