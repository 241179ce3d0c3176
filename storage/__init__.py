"""Storage, in rooms: formats/ (file formats), objectstore.py (local disk and S3), database/ (SQL), errors.py."""
