"""Typed errors of the DynamoDB / DynamoDB Streams API.

The shard worker decides what to do from the *kind* of failure: an expired
iterator is renewed, trimmed data is reported loudly and needs a rebuild (I5), throttling and
5xx back off, a missing stream stops the shard. Those decisions must not depend on string
matching scattered through the code, so every failure of a :class:`~viewkeeper.stream.client.
StreamClient` — the HTTP client and the in-process fake alike — is one of these classes.

Each error carries the AWS error ``code`` (the text after ``#`` in the response's
``__type``, e.g. ``ExpiredIteratorException``) and the service's ``message``. Messages never
contain request headers or signatures, so printing or logging an error cannot leak
credentials.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "ConnectionFailedError",
    "ExpiredIteratorError",
    "ResourceNotFoundError",
    "ServiceError",
    "StreamError",
    "ThrottlingError",
    "TrimmedDataAccessError",
    "ValidationError",
    "error_class_for",
]


class StreamError(Exception):
    """Base of every DynamoDB / Streams API failure.

    ``code`` is the AWS error code (defaults to the class's typical one so tests and the fake
    can write ``ExpiredIteratorError("...")``); ``operation`` the API action (``GetRecords``);
    ``status`` the HTTP status when there was a response; ``request_id`` AWS's request id, for
    support cases.
    """

    default_code = "StreamError"
    retryable = False

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        operation: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        self.code = code or self.default_code
        self.message = message
        self.operation = operation
        self.status = status
        self.request_id = request_id
        super().__init__(message)

    def __str__(self) -> str:
        where = f"{self.operation}: " if self.operation else ""
        extra = []
        if self.status is not None:
            extra.append(f"HTTP {self.status}")
        if self.request_id:
            extra.append(f"request id {self.request_id}")
        tail = f" ({', '.join(extra)})" if extra else ""
        return f"{where}{self.code}: {self.message}{tail}"

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only arguments do not survive the default pickling of exceptions
        return (
            _rebuild,
            (type(self), self.message, self.code, self.operation, self.status, self.request_id),
        )


def _rebuild(
    cls: type[StreamError],
    message: str,
    code: str,
    operation: str | None,
    status: int | None,
    request_id: str | None,
) -> StreamError:
    return cls(message, code=code, operation=operation, status=status, request_id=request_id)


class ExpiredIteratorError(StreamError):
    """The shard iterator is older than 15 minutes: get a new one after the last sequence."""

    default_code = "ExpiredIteratorException"


class TrimmedDataAccessError(StreamError):
    """The iterator or sequence number points at records past the 24 h retention (I5)."""

    default_code = "TrimmedDataAccessException"


class ResourceNotFoundError(StreamError):
    """The table, stream or shard does not exist (deleted table, disabled stream, bad id)."""

    default_code = "ResourceNotFoundException"


class ThrottlingError(StreamError):
    """ProvisionedThroughputExceeded, LimitExceeded (e.g. > 10 DescribeStream/s) or
    ThrottlingException: back off and try again."""

    default_code = "ThrottlingException"
    retryable = True


class ServiceError(StreamError):
    """A 5xx from the service (moto answers every error with an HTTP 500), a damaged
    response, or a connection failure: transient, back off and try again."""

    default_code = "InternalServerError"
    retryable = True


class ConnectionFailedError(ServiceError):
    """No response at all: connection refused/reset, timeout, TLS failure. A ServiceError so
    that callers handling transient failures need only one except clause."""

    default_code = "ConnectionError"


class AccessDeniedError(StreamError):
    """Missing, invalid or insufficient credentials. Not retried: it needs a human."""

    default_code = "AccessDeniedException"


class ValidationError(StreamError):
    """The request was malformed (bad parameter, bad sequence number): a bug, not retried."""

    default_code = "ValidationException"


_BY_CODE: dict[str, type[StreamError]] = {
    "ExpiredIteratorException": ExpiredIteratorError,
    "TrimmedDataAccessException": TrimmedDataAccessError,
    "ResourceNotFoundException": ResourceNotFoundError,
    "ProvisionedThroughputExceededException": ThrottlingError,
    "LimitExceededException": ThrottlingError,
    "ThrottlingException": ThrottlingError,
    "Throttling": ThrottlingError,
    "RequestLimitExceeded": ThrottlingError,
    "TooManyRequestsException": ThrottlingError,
    "InternalServerError": ServiceError,
    "InternalFailure": ServiceError,
    "ServiceUnavailable": ServiceError,
    "ServiceUnavailableException": ServiceError,
    "AccessDeniedException": AccessDeniedError,
    "UnrecognizedClientException": AccessDeniedError,
    "InvalidSignatureException": AccessDeniedError,
    "IncompleteSignature": AccessDeniedError,
    "IncompleteSignatureException": AccessDeniedError,
    "MissingAuthenticationToken": AccessDeniedError,
    "MissingAuthenticationTokenException": AccessDeniedError,
    "InvalidClientTokenId": AccessDeniedError,
    "ExpiredTokenException": AccessDeniedError,
    "ValidationException": ValidationError,
    "SerializationException": ValidationError,
}


def error_class_for(code: str | None, status: int) -> type[StreamError]:
    """The class for an AWS error ``code`` (text after ``#`` in ``__type``) and HTTP status.

    The code wins when it is known; otherwise the status decides (5xx → ServiceError, 429 →
    ThrottlingError, 401/403 → AccessDeniedError, other 4xx → ValidationError for a
    ``...ValidationException``-like code, else the base StreamError).
    """
    if code:
        known = _BY_CODE.get(code)
        if known is not None:
            return known
    if status >= 500:
        return ServiceError
    if status == 429:
        return ThrottlingError
    if status in (401, 403):
        return AccessDeniedError
    if code and "Validation" in code:
        return ValidationError
    return StreamError
