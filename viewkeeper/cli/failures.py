"""Failures of the ``viewkeeper`` command, put into one line each: what, where (host:port,
never a secret) and the fix; the exit code (1 a runtime failure, 78 a configuration one)."""

from __future__ import annotations

import logging
import ssl
from urllib.parse import urlsplit

log = logging.getLogger("viewkeeper.cli")

EX_CONFIG = 78


EX_FAILURE = 1


# --- failures: one line each --------------------------------------------------------------
class Failure(Exception):
    """A failure the CLI has already put into words (one line, with the fix)."""

    def __init__(self, message: str, code: int = EX_FAILURE) -> None:
        super().__init__(message)
        self.code = code


dynamodb_where = "DynamoDB"  # where DynamoDB is, for messages (set once the config is loaded)


_SERVICE_FIX = "check that the service is running and that the config points at it"


_AWS_CREDENTIALS_FIX = (
    "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, aws.profile or the "
    "instance role) and that their IAM policy allows viewkeeper's DynamoDB actions"
)


def _one_line(text: str) -> str:
    from viewkeeper.ops.logs import redact

    return redact(" ".join(str(text).split()))


def explain_failure(exc: BaseException) -> tuple[str, int] | None:
    """``(one line, exit code)`` for a runtime failure the operator can act on, or None for
    anything else (a bug, which keeps its traceback)."""
    from botocore import exceptions as boto

    from viewkeeper.coordination.dynamodb import CoordinationTableError
    from viewkeeper.runtime.namespaces import NamespaceOwned
    from viewkeeper.runtime.supervisor import StreamNotReadable, SupervisorFatal
    from viewkeeper.sinks.base import SinkError, SinkUnavailable
    from viewkeeper.stream.errors import StreamError

    if isinstance(exc, Failure):
        return _one_line(str(exc)), exc.code
    if isinstance(exc, CoordinationTableError):
        return _one_line(str(exc)), EX_CONFIG if exc.configuration else EX_FAILURE
    if isinstance(exc, NamespaceOwned | SupervisorFatal):
        return _one_line(str(exc)), EX_CONFIG  # fixed in the config (or by a take-over)
    if isinstance(exc, SinkUnavailable):
        return _one_line(sink_failure_text(exc)), EX_FAILURE
    if isinstance(exc, SinkError):
        return _one_line(str(exc)), EX_FAILURE
    if isinstance(exc, StreamNotReadable):
        return _one_line(str(exc)), EX_FAILURE
    if isinstance(exc, StreamError):
        return _one_line(_stream_failure_text(exc)), EX_FAILURE
    if isinstance(exc, boto.ClientError | boto.BotoCoreError):
        message, code = _botocore_failure_text(exc)
        return _one_line(message), code
    if isinstance(exc, OSError):
        return _one_line(_os_failure_text(exc)), EX_FAILURE
    return None


def sink_failure_text(exc: BaseException) -> str:
    """A sink's failure with the fix: its message names the sink and host:port."""
    text = str(exc)
    lowered = text.lower()
    if "authentication failed" in lowered:
        return text  # carries its own fix
    if "certificate verify failed" in lowered or "certificate_verify_failed" in lowered:
        return (
            f"{text}; the server's TLS certificate is not trusted: set ssl_ca_file (Redis) "
            "or ca_certs (OpenSearch) to the CA that signed it"
        )
    return f"{text.rstrip('. ')}; {_SERVICE_FIX}"


def _stream_failure_text(exc: BaseException) -> str:
    from viewkeeper.stream import errors

    where = dynamodb_where
    if isinstance(exc, errors.ConnectionFailedError):
        return f"{where} cannot be reached: {exc}; {_SERVICE_FIX} (aws.endpoint_url, aws.region)"
    if isinstance(exc, errors.AccessDeniedError):
        return f"{where}: {exc}; {_AWS_CREDENTIALS_FIX}"
    if isinstance(exc, errors.ResourceNotFoundError):
        return (
            f"{where}: {exc}; create the table, or fix the views' table= or aws.region / "
            "aws.endpoint_url"
        )
    if isinstance(exc, errors.ThrottlingError | errors.ServiceError):
        return f"{where}: {exc}; a temporary failure of the service: start again later"
    return f"{where}: {exc}"


def _botocore_failure_text(exc: BaseException) -> tuple[str, int]:
    from botocore import exceptions as boto

    where = dynamodb_where
    if isinstance(exc, boto.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "error"))
        text = f"{where}: {exc.operation_name} failed: {code}: {error.get('Message', '')}"
        if code in (
            "AccessDeniedException",
            "UnrecognizedClientException",
            "InvalidSignatureException",
            "ExpiredTokenException",
            "MissingAuthenticationTokenException",
        ):
            return f"{text}; {_AWS_CREDENTIALS_FIX}", EX_FAILURE
        if code == "ResourceNotFoundException":
            return f"{text}; check coordination.table and aws.region", EX_FAILURE
        if code == "ResourceInUseException":
            return (
                f"{text}; the coordination table is being created or changed (another "
                "viewkeeper starting at the same time?): start again in a few seconds",
                EX_FAILURE,
            )
        return f"{text}; start again later (logging.level: DEBUG shows the details)", EX_FAILURE
    if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
        return f"{where}: no usable AWS credentials ({exc}); {_AWS_CREDENTIALS_FIX}", EX_FAILURE
    if isinstance(exc, boto.ProfileNotFound):
        return f"aws.profile: {exc}; fix aws.profile or add the profile to ~/.aws", EX_CONFIG
    if isinstance(exc, boto.NoRegionError):
        return f"{where}: {exc}; set aws.region", EX_CONFIG
    kwargs = getattr(exc, "kwargs", None) or {}
    url = kwargs.get("endpoint_url")
    if url:
        where = f"DynamoDB at {_host_port(str(url))}"
    if isinstance(exc, boto.ConnectionError | boto.HTTPClientError):
        return (
            f"{where} cannot be reached ({exc}); {_SERVICE_FIX} (aws.endpoint_url, aws.region)",
            EX_FAILURE,
        )
    return f"{where}: {exc}", EX_FAILURE


def _os_failure_text(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or "no details"
    if exc.filename is not None:
        return f"{exc.filename}: {type(exc).__name__}: {reason}"
    return f"{type(exc).__name__}: {reason}"


def _host_port(url: str) -> str:
    """``host:port`` of an http(s) URL (80/443 when it names none); never user or password."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or "<no host>"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``exc`` (redis-py wraps it), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
