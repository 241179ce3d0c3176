"""The trigger forms' fields the YouTube-8M DAGs share, as builders of Airflow Params (no DAG here): a
location, an optional number or text, a flag, a level, a split and a file pattern read the same in every
form."""

from airflow.sdk import Param

from storage.formats.yt8m_spec import FRAME, LEVELS  # constants only: cheap to parse

# A location in the form: empty (the Airflow variable), an absolute path, a file:/// or an s3:// URI (a bucket,
# then a key), without control characters. A relative path would depend on the worker's working folder.
URI_PATTERN = r"^(?![\s\S]*[\x00-\x1f])(|/.*|file:///.*|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?)$"
SPLITS = ["train", "validate", "test"]


def location(title: str, description: str) -> Param:
    """A folder or file URI, empty by default (the description says what empty means)."""
    return Param(None, type=["null", "string"], pattern=URI_PATTERN, title=title, description=description)


def optional(kind: str, title: str, description: str, **limits) -> Param:
    """A number (`kind` "integer" or "number") or text left empty unless given."""
    return Param(None, type=["null", kind], title=title, description=description, **limits)


def flag(title: str, description: str, default: bool = False) -> Param:
    return Param(default, type="boolean", title=title, description=description)


def level(title: str) -> Param:
    return Param(FRAME.name, enum=list(LEVELS), title=title)


def split(default: str, title: str) -> Param:
    return Param(default, enum=SPLITS, title=title)


def file_pattern(default: str, title: str, description: str | None = None) -> Param:
    return Param(
        default, type="string", minLength=1, title=title, **({"description": description} if description else {})
    )
