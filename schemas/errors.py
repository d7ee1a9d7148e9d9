"""The one root of every error the library raises on purpose, and the kinds front ends map.

A front end never lists exception classes: the CLI turns a kind into its exit status and the
REST service into an HTTP status, each in one table. `code` is stable (clients may match on it);
the message is for people and may change.
"""

from enum import StrEnum
from typing import ClassVar


class ErrorKind(StrEnum):
    INPUT = "input"  # the request: flags, a spec, a name, a path or a value the user gave
    NOT_FOUND = "not_found"  # an id or a name that names nothing registered
    DATA = "data"  # data that cannot be read, is damaged, or holds nothing usable
    MODEL = "model"  # a model or its weights missing or unusable
    CONFLICT = "conflict"  # clashes with existing state: a job id reused with another spec
    INTERNAL = "internal"  # a bug, or the machinery (Ray, the catalog) failing


class CurateError(Exception):
    """An error with a kind and a stable code; a subclass sets both, an instance may narrow them.

    The instance override is for errors that carry another one across a process boundary (a
    failed part): they take the kind and code of what failed on the worker.
    """

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL
    code: ClassVar[str] = "internal"

    def __init__(
        self, message: str = "", *, kind: ErrorKind | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind  # type: ignore[misc]
        if code is not None:
            self.code = code  # type: ignore[misc]

    def to_dict(self) -> dict[str, str]:
        """The shape an API error body carries."""
        return {"kind": str(self.kind), "code": self.code, "message": str(self)}


class InputError(CurateError):
    kind = ErrorKind.INPUT
    code = "invalid_input"


class NotFoundError(CurateError):
    kind = ErrorKind.NOT_FOUND
    code = "not_found"


class DataError(CurateError):
    kind = ErrorKind.DATA
    code = "bad_data"


class ModelError(CurateError):
    kind = ErrorKind.MODEL
    code = "model_unavailable"


class ConflictError(CurateError):
    kind = ErrorKind.CONFLICT
    code = "conflict"


class InternalError(CurateError):
    kind = ErrorKind.INTERNAL
    code = "internal"
