"""The Video tags pages: a FastAPI app the Airflow plugin (plugins/video_tags_plugin.py) mounts."""
