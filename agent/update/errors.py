"""The update package's error root: every refusal or failure of a job carries a stable code."""

from __future__ import annotations


class UpdateCode:
    """Stable codes, in replies (`error.code`) and in `update.failed` / `update.rolled_back` events."""

    BAD_ARGS = "update.bad_args"  # a deploy/rollback argument is missing, of the wrong type or out of range
    BUSY = "update.busy"  # another job is running
    NOT_NEWER = "update.not_newer"  # version not newer than the served one (no allow_downgrade)
    MARKED_BAD = (
        "update.marked_bad"  # this version was rolled back before (deploy with force to retry)
    )
    NO_SPACE = "update.no_space"  # not enough free disk for download + unpack + what stays
    DOWNLOAD_FAILED = (
        "update.download_failed"  # connection, TLS, HTTP status, timeouts, retries spent
    )
    OVERSIZE = "update.oversize"  # the source sent more than the signed size
    HASH_MISMATCH = "update.hash_mismatch"  # sha256 of the download differs from the deploy's
    TRANSFER_FAILED = (
        "update.transfer_failed"  # an MQTT chunk transfer gave up (missing chunks, bad chunk)
    )
    BUNDLE_REFUSED = "update.bundle_refused"  # a bundle rule refused it (detail: the bundle.* code)
    VALIDATION_FAILED = (
        "update.validation_failed"  # golden replay, memory admission, latency budget
    )
    SHADOW_DISAGREED = "update.shadow_disagreed"  # shadow agreement under the bound: not promoted
    TRIAL_FAILED = "update.trial_failed"  # a trial bound was crossed after the swap: rolled back
    CRASH_LOOP = "update.crash_loop"  # the agent kept dying with the candidate: rolled back
    CANCELLED = "update.cancelled"  # update.cancel before the point of no return
    NOTHING_TO_CANCEL = "update.nothing_to_cancel"
    NO_SUCH_VERSION = "update.no_such_version"  # rollback to a version no longer on disk
    INDEX_INVALID = "update.index_invalid"  # release index unsigned, malformed, untrusted signer
    INDEX_EXPIRED = "update.index_expired"  # release index past its expiry (freeze attack)
    INDEX_ROLLBACK = (
        "update.index_rollback"  # release index counter lower than one seen (rollback attack)
    )
    DISABLED = "update.disabled"  # update.enabled is false on this device
    PHASE_TIMEOUT = "update.phase_timeout"  # a phase ran past update.phase_timeout_s
    INTERRUPTED = "update.interrupted"  # the agent died mid-job; recovery ended it at start
    INTERNAL = "update.internal"  # a bug; the old model keeps serving


class UpdateError(Exception):
    """A job refused or failed; `code` is one of UpdateCode, `data` carries figures."""

    def __init__(self, code: str, message: str, **data: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


__all__ = ["UpdateCode", "UpdateError"]
