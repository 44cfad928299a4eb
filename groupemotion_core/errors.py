"""One error type for everything a user can get wrong.

Every mistake a user can make (bad media, a bad checkpoint, a bad URI, a bad label) raises a
subclass of GroupEmotionError carrying a short machine-readable `reason` code. The CLI turns it
into `error: <reason>: <detail>` and an exit status an orchestrator can act on (`exit_status`);
the pipelines turn it into an `error` value in a row. Anything else that escapes is a bug and
keeps its traceback.

The exit status splits the reasons in two, because a retry loop (a RayJob's backoffLimit, a
workflow engine) must not rerun a typo forever nor give up on a throttled store:
- EXIT_MISTAKE (2, as argparse exits): the same command fails the same way until someone fixes
  the arguments, the credentials, the input or the weights.
- EXIT_RETRY (75, EX_TEMPFAIL from sysexits.h): the cluster or the store failed under the job
  (`RETRYABLE`); running the same command again finishes the work, exactly once.
"""

from __future__ import annotations

EXIT_MISTAKE = 2
EXIT_RETRY = 75  # EX_TEMPFAIL
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

# Failures of the cluster or the store, not of the command: no progress for --stall-timeout (a
# lost node not replaced, a store that stopped answering), a node Ray could not recover the work
# of, a store that kept failing after its retries.
RETRYABLE = frozenset({"stalled", "worker_lost", "storage_unavailable"})


class GroupEmotionError(Exception):
    """A user-facing failure with a stable reason code (e.g. "not_media", "bad_checkpoint").
    `str()` of it is the `<reason>: <detail>` value a row's `error` carries (`split_error` reads it)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    @property
    def retryable(self) -> bool:
        """Whether running the same command again can finish the work (see RETRYABLE)."""
        return self.reason in RETRYABLE

    @property
    def exit_status(self) -> int:
        return EXIT_RETRY if self.retryable else EXIT_MISTAKE

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
