"""How a stage stops: a failure on a worker, no node able to run its work, or the driver's clean
stop. Raised by the executor (pipelines/executor.py) and its placement (pipelines/placement.py);
the CLI and the service read them."""

import threading

from schemas.errors import CurateError, ErrorKind


class StageFailed(CurateError):
    """A stage stopped: a part or a whole-stage step failed. It carries the kind and code of
    the error that failed on the worker, when that was one of ours."""

    code = "stage_failed"


class JobCancelled(CurateError):
    """The driver was asked to stop (SIGTERM: a cancel from the service, or `kill`): the stage
    under way and the job are recorded `cancelled`; committed parts stay, and a re-run resumes."""

    kind = ErrorKind.CONFLICT
    code = "job_cancelled"


class Unschedulable(StageFailed):
    """No live node of the cluster has the resources a stage's work asks for."""

    code = "unschedulable"


# Set by the driver's SIGTERM handler (pipelines/job.py), which then raises KeyboardInterrupt:
# the one exception Ray's blocking calls (ray.wait, ray.get) give way to; any other raised by a
# signal handler inside them is swallowed and the wait goes on.
STOP_REQUESTED = threading.Event()


def is_cancel(error: BaseException) -> bool:
    """Whether an exception is the driver's clean stop rather than a failure or a Ctrl-C."""
    return isinstance(error, JobCancelled) or (
        isinstance(error, KeyboardInterrupt) and STOP_REQUESTED.is_set()
    )


def failure(label: str, error: BaseException) -> StageFailed:
    """The error a worker raised (unwrapped from Ray's task and actor errors), as a StageFailed
    naming where it happened."""
    cause: BaseException = error
    # A task error carries our exception; an actor that died in __init__ carries its task error.
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    kind = cause.kind if isinstance(cause, CurateError) else ErrorKind.INTERNAL
    code = cause.code if isinstance(cause, CurateError) else None
    return StageFailed(f"{label}: {type(cause).__name__}: {cause}", kind=kind, code=code)
