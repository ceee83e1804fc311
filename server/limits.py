"""Declared maxima of the strings a caller sends, checked at the edge before anything runs.

Every string field has a bound, so no value a caller sends (an admin's included) can make a
later call fail: a 600,000-character SetLive reason kept in the registry's history once made
every ListModels reply exceed gRPC's 4 MiB default and fail for good, and a 256-character
version name reached the file system (ENAMETOOLONG) and answered INTERNAL. A value over its bound
is INVALID_ARGUMENT naming the field and the limit; the message never echoes the value itself.
The bounds of Generate's and Feedback's ids live beside their checks (MAX_REQUEST_ID_CHARS,
MAX_EVENT_ID_CHARS); prompts and corrections are bounded by the server's config.
"""

from __future__ import annotations

from collections.abc import Sequence

from feedloop.server.errors import InvalidArgument, require_text

# Registry version names are "v0001"-style; 64 leaves room for any naming scheme and stays far
# below every file system's 255-byte name limit.
MAX_VERSION_CHARS = 64
# A reason is a sentence or two for the decision history; ListModels returns up to
# DEFAULT_MAX_DECISIONS of them, so 1,000 characters each keeps a reply far below 4 MiB.
MAX_REASON_CHARS = 1000
# GetOnlineReport's versions: more than a dashboard would ever ask for at once.
MAX_VERSIONS_PER_REQUEST = 64
# ListModels' max_decisions: at most this many decisions per reply.
MAX_DECISIONS_PER_REPLY = 1000


def require_bounded(value: str, field: str, limit: int) -> str:
    """value if it has at most limit characters and no NUL; else InvalidArgument naming the
    field and the limit (never the value: it may be megabytes)."""
    if len(value) > limit:
        raise InvalidArgument(field, f"at most {limit} characters, got {len(value)}")
    return require_text(value, field)


def require_version(value: str, field: str, *, required: bool = False) -> str:
    """A model version name as a caller sends it (empty allowed unless required)."""
    if required and not value:
        raise InvalidArgument(field, "required")
    return require_bounded(value, field, MAX_VERSION_CHARS)


def require_reason(value: str, field: str = "reason") -> str:
    return require_bounded(value, field, MAX_REASON_CHARS)


def require_versions(values: Sequence[str], field: str) -> list[str]:
    if len(values) > MAX_VERSIONS_PER_REQUEST:
        raise InvalidArgument(field, f"at most {MAX_VERSIONS_PER_REQUEST} versions")
    for i, value in enumerate(values):
        if not value:
            raise InvalidArgument(field, "must not hold an empty name")
        require_version(value, f"{field}[{i}]")
    return list(values)


def shorten(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """text cut to limit characters (an ellipsis marks the cut): for values stored before the
    bounds existed, so they cannot make a reply too large either."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
