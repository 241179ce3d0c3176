"""How the Video tags pages show numbers and times to people (Jinja filters, registered in app.py): scores
to 3 decimals with a bar, counts with thousands separators, durations in words, dates relative to now with
the exact time on hover. Each returns escaped markup."""

from datetime import UTC, datetime, timedelta

from markupsafe import Markup, escape


def score(value) -> Markup:
    """0.0347962... -> a bar as long as the score and `0.035`."""
    if value is None:
        return Markup("")
    value = float(value)
    width = max(0.0, min(1.0, value)) * 100
    return Markup(
        f'<span class="score" title="{value:.6f}"><span class="bar" style="width:{width:.1f}%"></span>'
        f'<span class="num">{value:.3f}</span></span>'
    )


def count(value) -> str:
    return "" if value is None else f"{int(value):,}"


def percent(value) -> str:
    return "" if value is None else f"{100 * float(value):.1f}%"


def duration(value) -> str:
    """A timedelta (or seconds) as `1 h 02 min`, `3 min 05 s`, `4.2 s`."""
    if value is None:
        return ""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _relative(value: datetime, now: datetime | None) -> tuple[datetime, str, str]:
    """(value in UTC, `3 hours ago` / `in 2 days`, its exact UTC time)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # SQLite keeps no offset: times are stored in UTC
    exact = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = (now or datetime.now(UTC)) - value
    seconds, future = abs(delta.total_seconds()), delta.total_seconds() < 0
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            words = f"{n} {unit}{'s' if n != 1 else ''}"
            break
    else:
        words = "seconds"
    return value, f"in {words}" if future else f"{words} ago", exact


def when(value, now: datetime | None = None) -> Markup:
    """A datetime as `3 hours ago` / `in 2 days`, its exact UTC time on hover (`<time>`)."""
    if value is None:
        return Markup("")
    value, text, exact = _relative(value, now)
    return Markup(f'<time datetime="{escape(value.isoformat())}" title="{exact}">{escape(text)}</time>')


def when_text(value, now: datetime | None = None) -> str:
    """The same as plain text, the exact time in brackets (for figures a script writes into a page)."""
    if value is None:
        return ""
    _, text, exact = _relative(value, now)
    return f"{text} ({exact})"


FILTERS = {"score": score, "count": count, "percent": percent, "duration": duration, "when": when}
