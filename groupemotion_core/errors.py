"""One error type for everything a user can get wrong.

Every mistake a user can make (bad media, a bad checkpoint, a bad URI, a bad label) raises a
subclass of GroupEmotionError carrying a short machine-readable `reason` code. The CLI turns it
into `error: <reason>: <detail>` and exit status 2; the pipelines turn it into an `error` value
in a row. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class GroupEmotionError(Exception):
    """A user-facing failure with a stable reason code (e.g. "not_media", "bad_checkpoint").
    `str()` of it is the `<reason>: <detail>` value a row's `error` carries (`split_error` reads it)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep reason/detail when Ray ships the error between processes
        return (type(self), (self.reason, self.detail))


def split_error(error: str) -> tuple[str, str]:
    """A row's `error` value, `<reason>: <detail>` (as a GroupEmotionError reads), -> (reason,
    detail). Every stage that counts, compares or re-raises a row's error parses it here, so
    the format is read one way; a value without a reason counts as "unknown"."""
    reason, _, detail = error.partition(":")
    return reason.strip() or "unknown", detail.strip()


def error_reason(error: str) -> str:
    return split_error(error)[0]
