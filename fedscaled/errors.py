"""One catalog of every error the daemon and its CLI can report.

Each error class carries a machine-readable ``code``, the HTTP status it is rendered with
(device API and control API alike) and the exit code ``fedscalectl`` uses when it reports it.
The middleware in :mod:`fedscaled.http_errors` renders them as
``{"error": {"code": ..., "message": ...}}``; ``docs/errors.md`` lists them all (a test checks).
"""

from __future__ import annotations

from typing import Any, ClassVar

# fedscalectl exit codes (documented in `fedscalectl --help` and docs/cli.md).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


class FedError(Exception):
    """Base of every reportable error: a code, an HTTP status and a CLI exit code."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    exit_code: ClassVar[int] = EXIT_FAILURE
    description: ClassVar[str] = "An unexpected error inside the daemon."

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        """The body the HTTP APIs send for this error."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class InvalidConfig(FedError):
    code = "invalid_config"
    status = 400
    exit_code = EXIT_USAGE
    description = "The job file is not valid YAML, has an unknown key, or a value of the wrong type or range."


class JobExists(FedError):
    code = "job_exists"
    status = 409
    exit_code = EXIT_FAILURE
    description = "A job with this name exists (and is still active, or --replace was not given)."


class JobNotFound(FedError):
    code = "job_not_found"
    status = 404
    exit_code = EXIT_FAILURE
    description = "No job has this name."


class JobNotActive(FedError):
    code = "job_not_active"
    status = 409
    exit_code = EXIT_FAILURE
    description = "The job has already ended (finished, stopped or failed)."


class BadRequest(FedError):
    code = "bad_request"
    status = 400
    exit_code = EXIT_USAGE
    description = "The request is malformed: not JSON, a missing or mistyped field."


class Unauthorized(FedError):
    code = "unauthorized"
    status = 401
    description = "Missing, malformed or wrong bearer token or enrollment token."


class UnknownTask(FedError):
    code = "unknown_task"
    status = 404
    description = "No task with this id was issued to this device."


class WrongRound(FedError):
    code = "wrong_round"
    status = 409
    description = "The task belongs to a round that has already closed: the upload is late and was dropped."


class StaleUpdate(FedError):
    code = "stale_update"
    status = 409
    description = ("Asynchronous jobs: the update was trained on a model more than max_staleness versions older "
                   "than the one it would be applied to; it was dropped. Check in for a task on the latest model.")


class TaskExpired(FedError):
    code = "task_expired"
    status = 410
    description = "The task's deadline has passed; the upload was dropped."


class WrongTaskKind(FedError):
    code = "wrong_task_kind"
    status = 409
    description = "A training upload for a test task, or test results for a training task."


class UnknownModelVersion(FedError):
    code = "unknown_model_version"
    status = 404
    description = "No model with this version is stored for the job (never made, or pruned)."


class NoArtifact(FedError):
    code = "no_artifact"
    status = 404
    description = ("The job serves no artifact (or no such artifact file) for this backend; the job's model "
                   "description lists the backends it serves.")


class InvalidTensor(FedError):
    code = "invalid_tensor"
    status = 422
    description = (
        "The safetensors body does not match the model: wrong or missing tensor names, shapes, dtype, "
        "a truncated or malformed body, or NaN/Inf values."
    )


class InvalidMetadata(FedError):
    code = "invalid_metadata"
    status = 422
    description = "Upload metadata (samples, loss, counts) is missing, mistyped or out of range."


class PayloadTooLarge(FedError):
    code = "payload_too_large"
    status = 413
    description = "The request body is larger than the job's model allows."


class Overloaded(FedError):
    code = "overloaded"
    status = 503
    description = "The daemon is shedding load; retry after the Retry-After header's seconds."


class RateLimited(FedError):
    code = "rate_limited"
    status = 429
    description = "Too many requests of this kind (enrollments per token or per address); retry after Retry-After."


class StorageFull(FedError):
    code = "storage_full"
    status = 507
    description = "The daemon's disk is full; nothing was stored. Retry after Retry-After: space is reclaimed."


class JobFull(FedError):
    code = "job_full"
    status = 409
    description = "The job has its max_devices enrolled devices; it takes no more until the operator revokes some."


class DeviceNotFound(FedError):
    code = "device_not_found"
    status = 404
    description = "The job has no device with this id (fedscalectl revoke)."


class DeviceRevoked(FedError):
    code = "device_revoked"
    status = 403
    description = "The operator revoked this device (fedscalectl revoke); it may not enroll again with its token."


class ApiVersionMismatch(FedError):
    code = "api_version_mismatch"
    status = 400
    exit_code = EXIT_FAILURE
    description = "fedscalectl and the daemon speak different control-API versions."


class DaemonNotRunning(FedError):
    code = "daemon_not_running"
    status = 503
    exit_code = EXIT_NOT_RUNNING
    description = "fedscalectl found no daemon at the control socket (no socket file, or connection refused)."


class StoreError(FedError):
    code = "store_error"
    status = 500
    description = "The LMDB store failed (disk full, wrong schema version, corrupted file)."


def catalog() -> list[type[FedError]]:
    """Every error class, base first, for documentation and tests."""
    found: list[type[FedError]] = [FedError]
    pending: list[type[FedError]] = [FedError]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.append(sub)
            pending.append(sub)
    return found


def by_code(code: str) -> type[FedError]:
    """The error class for a code received over the wire (unknown codes map to the base)."""
    for cls in catalog():
        if cls.code == code:
            return cls
    return FedError
