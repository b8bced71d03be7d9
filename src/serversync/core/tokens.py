"""Tracking tokens in subjects: ``Re: Quote [SSY:000042]``.

The reference system appends ``<prefix><digits>`` with a three-digit counter that wraps at
999 and so produces duplicates. Ours is the email activity's id, bracketed with the
configurable prefix: unique for the life of the database, never reused, and easy to find
again in a reply's subject whatever the mail client did to the ``Re:``/``Fwd:`` prefixes.
"""

from __future__ import annotations

import re

_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,19}$")


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise ValueError("a tracking token prefix is 1-20 letters and digits, starting with a letter")
    return prefix


def make_token(prefix: str, activity_id: int) -> str:
    return f"[{check_prefix(prefix)}:{activity_id:06d}]"


def add_token(subject: str, token: str) -> str:
    """Append the token once; a subject that already carries it is left alone."""
    if token in subject:
        return subject
    return f"{subject} {token}".strip()


def find_token(subject: str, prefix: str) -> int | None:
    """The activity id of the last token with ``prefix`` in ``subject``, if any."""
    found = re.findall(rf"\[{re.escape(prefix)}:(\d{{1,18}})\]", subject, flags=re.IGNORECASE)
    return int(found[-1]) if found else None


def strip_token(subject: str, prefix: str) -> str:
    return re.sub(rf"\s*\[{re.escape(prefix)}:\d{{1,18}}\]", "", subject, flags=re.IGNORECASE)
