"""The Video tags pages in Airflow's UI (Browse menu). Airflow imports every .py here as a top-level
module, so this stays one file: the app lives in the project package (airflow_glue/ui)."""

from airflow.plugins_manager import AirflowPlugin

from airflow_glue.ui.app import PREFIX, app


class VideoTagsPlugin(AirflowPlugin):
    name = "video_tags"
    fastapi_apps = [{"app": app, "url_prefix": PREFIX, "name": "Video tags"}]
    external_views = [
        {
            "name": "Video tags",
            "href": f"{PREFIX}/",
            "url_route": "video-tags",
            "destination": "nav",
            "category": "browse",
        }
    ]
