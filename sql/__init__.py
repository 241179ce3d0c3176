"""Schema migrations (Alembic, in migrations/) and the SQL queries users run (queries/)."""
