"""The `vtag` options and argument types several subcommands share (tasks/cli.py): the database, the
precision, how segments are scored, a lock timeout, an ISO date."""

import argparse
from datetime import UTC, datetime

from model.config import PRECISIONS
from storage.formats.yt8m_spec import SEGMENT_METHODS
from tasks import settings

DEVICE_PRECISION = "lstm-fp32 on a GPU, fp32 on a CPU"


def segment_method_arg(parser: argparse.ArgumentParser, default: str, when: str) -> None:
    parser.add_argument(
        "--segment-method",
        choices=SEGMENT_METHODS,
        default=default,
        help=f"{when}: the model over each segment's 5 frames, or the AttentionLSTM's attention (default {default})",
    )


def precision_arg(parser: argparse.ArgumentParser, scoring: bool) -> None:
    """Training defaults to the device's policy; scoring to the checkpoint's, which defaults to the device's."""
    default = f"the checkpoint's, else {DEVICE_PRECISION}" if scoring else DEVICE_PRECISION
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help=f"what each part computes in (docs/model.md#precision; default: {default})",
    )


def db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="SQLAlchemy database URL (default: $VTAG_DB_URL or SQLite under $VTAG_HOME)",
    )


def lock_timeout_arg(value: str) -> float:
    """argparse type for --lock-timeout: checked as $VTAG_LOCK_TIMEOUT_S is."""
    from storage.errors import UsageError

    try:
        return settings.lock_timeout_s(value, "--lock-timeout")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--lock-timeout ")) from None


def iso_date(value: str) -> datetime:
    """argparse type for --logical-date: ISO 8601, UTC when it names no zone."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
