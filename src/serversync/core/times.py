"""Timestamps are UTC everywhere; this is the one place that makes them so.

SQLite hands back naive datetimes and config files may omit the offset: a naive value is
taken as UTC, an aware one is converted to UTC.
"""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """Now, in UTC: the default clock of every service (tests pass their own)."""
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def utc(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else as_utc(value)
