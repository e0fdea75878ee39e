"""Reading DynamoDB Streams (and scanning DynamoDB) over plain HTTP: the
:class:`~viewkeeper.stream.client.StreamClient` of the daemon.

Why not boto3's client: botocore's response parser costs about 100 µs per stream record
— more than everything else viewkeeper does with a record. Here the body of a GetRecords
response goes through :class:`~viewkeeper.stream.records.PageHead` only (msgspec, orjson).
boto3 is still used for what it is good at: credentials and region are resolved by a
``boto3.Session`` (environment, profiles, SSO, instance/container roles; refreshable
credentials refresh themselves) and every request is signed with botocore's ``SigV4Auth``.

Errors become the typed exceptions of :mod:`viewkeeper.stream.errors`. Throttling, 5xx and
connection failures are retried here (tenacity, full-jitter exponential backoff, bounded);
expired iterators, trimmed data and missing resources are not: the caller must decide.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
import urllib3
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import get_current_datetime
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from viewkeeper.stream.client import (
    ITERATOR_TYPES,
    PendingPage,
    RecordsPage,
    ScanPage,
    StreamClient,
    StreamPage,
    TableInfo,
    parse_records,
    parse_scan,
    parse_stream,
    parse_table,
)
from viewkeeper.stream.errors import (
    AccessDeniedError,
    ConnectionFailedError,
    ServiceError,
    StreamError,
    ValidationError,
    error_class_for,
)
from viewkeeper.stream.records import DecodeError, PageHead
from viewkeeper.stream.values import encode_value

if TYPE_CHECKING:
    import boto3

__all__ = ["HttpStreamClient"]

log = logging.getLogger("viewkeeper.stream.http")


# --- the HTTP implementation ---------------------------------------------------------------
_STREAMS_TARGET = "DynamoDBStreams_20120810"
_DYNAMODB_TARGET = "DynamoDB_20120810"
_CONTENT_TYPE = "application/x-amz-json-1.0"


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, StreamError) and exc.retryable


def _aws_host(region: str) -> str:
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def _host_header(url: str) -> str:
    """The Host header exactly as SigV4 signs it (lowercase, no default port)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default:
        host = f"{host}:{parts.port}"
    return host


class _QuietSigV4Auth(SigV4Auth):
    """botocore's SigV4 signer, without its DEBUG logging.

    ``SigV4Auth.add_auth`` logs the canonical request — which contains the
    X-Amz-Security-Token of temporary credentials — whenever DEBUG is enabled for botocore.
    This is the same sequence of botocore's own signing steps, minus those log lines, so that
    no log level ever shows a credential (``tests/test_stream_client.py`` checks it).
    """

    def add_auth(self, request: AWSRequest) -> None:
        request.context["timestamp"] = get_current_datetime().strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)  # type: ignore[attr-defined]
        string_to_sign = self.string_to_sign(request, self.canonical_request(request))
        signature = self.signature(string_to_sign, request)
        self._inject_signature_to_request(request, signature)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class _Api:
    url: str
    host: str
    target_prefix: str


class HttpStreamClient(StreamClient):
    """:class:`StreamClient` over pooled urllib3 connections, SigV4-signed per request.

    ``region`` defaults to the session's region; ``endpoint_url`` (e.g. moto's
    ``http://127.0.0.1:5000``) replaces both the Streams and the DynamoDB endpoint.
    ``session`` defaults to ``boto3.Session(region_name=region)`` — pass one built with a
    profile or explicit keys to choose credentials. ``max_pool`` connections are kept per
    endpoint (size it to the number of worker threads). Retries: up to ``max_attempts``
    tries in total for throttling, 5xx and connection failures, with full-jitter exponential
    backoff from ``backoff_initial`` up to ``backoff_max`` seconds per wait, and never longer
    than ``retry_deadline`` seconds overall.
    """

    def __init__(
        self,
        region: str | None = None,
        endpoint_url: str | None = None,
        session: boto3.Session | None = None,
        *,
        max_pool: int = 16,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 5,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        retry_deadline: float = 60.0,
        ca_bundle: str | None = None,
        user_agent: str = "viewkeeper/0.1",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if session is None:
            import boto3

            session = boto3.Session(region_name=region)
        self._session = session
        region = region or session.region_name
        if not region:
            raise ValueError(
                "no AWS region: set aws.region in the config, AWS_REGION / AWS_DEFAULT_REGION, "
                "or a region in the AWS profile"
            )
        self.region: str = region
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self._credentials: Any = None
        self._credentials_lock = threading.Lock()
        domain = _aws_host(region)
        streams_url = self.endpoint_url or f"https://streams.dynamodb.{region}.{domain}"
        dynamodb_url = self.endpoint_url or f"https://dynamodb.{region}.{domain}"
        self._streams = _Api(streams_url + "/", _host_header(streams_url), _STREAMS_TARGET)
        self._dynamodb = _Api(dynamodb_url + "/", _host_header(dynamodb_url), _DYNAMODB_TARGET)
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._max_attempts = max(1, max_attempts)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._retry_deadline = retry_deadline
        self._sleep = sleep
        self._user_agent = user_agent
        self._http = self._pool_manager(streams_url, max_pool, ca_bundle)

    # --- plumbing ------------------------------------------------------------------------
    def _pool_manager(self, url: str, max_pool: int, ca_bundle: str | None) -> urllib3.PoolManager:
        """Pooled, thread-safe connections; honours HTTPS_PROXY/NO_PROXY like boto3 does."""
        kwargs: dict[str, Any] = {
            "num_pools": 4,
            "maxsize": max_pool,
            "block": False,
            "retries": False,
            "timeout": self._timeout,
        }
        if url.startswith("https"):
            bundle = ca_bundle or self._session_config("ca_bundle")
            if bundle is None:
                try:
                    import certifi

                    bundle = certifi.where()
                except ImportError:  # pragma: no cover - urllib3 falls back to the system CAs
                    bundle = None
            if bundle:
                kwargs["ca_certs"] = bundle
        scheme = urlsplit(url).scheme
        proxy = urllib.request.getproxies().get(scheme)
        if proxy and not urllib.request.proxy_bypass(urlsplit(url).hostname or ""):
            return urllib3.ProxyManager(proxy, **kwargs)
        return urllib3.PoolManager(**kwargs)

    def _session_config(self, name: str) -> str | None:
        try:
            value = self._session._session.get_config_variable(name)
        except Exception:  # a custom session object without botocore internals
            return None
        return str(value) if value else None

    def _frozen_credentials(self) -> Any:
        creds = self._credentials
        if creds is None:
            with self._credentials_lock:
                if self._credentials is None:
                    self._credentials = self._session.get_credentials()
                creds = self._credentials
            if creds is None:
                raise AccessDeniedError(
                    "no AWS credentials found (boto3 looked at the environment, the shared "
                    "credentials/config files, SSO, and container/instance roles)",
                    code="NoCredentials",
                )
        # refreshable credentials refresh themselves here, under their own lock
        return creds.get_frozen_credentials()

    def _send(
        self, api: _Api, action: str, body: bytes, parse: Callable[[bytes], Any] = orjson.loads
    ) -> Any:
        """One signed POST; ``parse`` of the body of a 2xx (by default the decoded JSON), or a
        typed error. Parsing happens here so that a body that is not JSON is retried."""
        request = AWSRequest(
            method="POST",
            url=api.url,
            data=body,
            headers={
                "Host": api.host,
                "Content-Type": _CONTENT_TYPE,
                "X-Amz-Target": f"{api.target_prefix}.{action}",
                "User-Agent": self._user_agent,
            },
        )
        _QuietSigV4Auth(self._frozen_credentials(), "dynamodb", self.region).add_auth(request)
        try:
            resp = self._http.request(
                "POST",
                api.url,
                body=body,
                headers=dict(request.headers.items()),
                retries=False,
                redirect=False,
                timeout=self._timeout,
            )
        except urllib3.exceptions.HTTPError as exc:
            # urllib3's messages name the host and the failure, never our headers
            raise ConnectionFailedError(f"{type(exc).__name__}: {exc}", operation=action) from None
        data: bytes = resp.data
        status = resp.status
        request_id = resp.headers.get("x-amzn-RequestId")
        if 200 <= status < 300:
            crc = resp.headers.get("x-amz-crc32")
            if crc is not None and crc.isdigit() and zlib.crc32(data) != int(crc):
                raise ServiceError(
                    "response body does not match its x-amz-crc32 checksum (damaged in transit)",
                    code="CRC32CheckFailed",
                    operation=action,
                    status=status,
                    request_id=request_id,
                )
            try:
                return parse(data)
            except orjson.JSONDecodeError:
                raise ServiceError(
                    f"response is not JSON: {data[:120]!r}",
                    code="MalformedResponse",
                    operation=action,
                    status=status,
                    request_id=request_id,
                ) from None
        raise _error_from_response(action, status, data, request_id)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info(
            "%s (attempt %d of %d); retrying in %.2fs",
            exc,
            state.attempt_number,
            self._max_attempts,
            wait,
        )

    def _call(
        self,
        api: _Api,
        action: str,
        payload: Mapping[str, Any],
        parse: Callable[[bytes], Any] = orjson.loads,
    ) -> Any:
        """``_send`` with bounded retries of transient failures."""
        body = orjson.dumps(payload)
        retrying = Retrying(
            stop=stop_after_attempt(self._max_attempts) | stop_after_delay(self._retry_deadline),
            wait=wait_random_exponential(multiplier=self._backoff_initial, max=self._backoff_max),
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._log_retry,
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(self._send, api, action, body, parse)

    # --- the interface -------------------------------------------------------------------
    def describe_table(self, table: str) -> TableInfo:
        return parse_table(self._call(self._dynamodb, "DescribeTable", {"TableName": table}))

    def describe_stream(
        self, stream_arn: str, exclusive_start_shard_id: str | None = None
    ) -> StreamPage:
        payload: dict[str, Any] = {"StreamArn": stream_arn}
        if exclusive_start_shard_id is not None:
            payload["ExclusiveStartShardId"] = exclusive_start_shard_id
        return parse_stream(self._call(self._streams, "DescribeStream", payload))

    def get_shard_iterator(
        self,
        stream_arn: str,
        shard_id: str,
        iterator_type: str,
        sequence: str | None = None,
    ) -> str:
        payload = _iterator_request(stream_arn, shard_id, iterator_type, sequence)
        data = self._call(self._streams, "GetShardIterator", payload)
        iterator = data.get("ShardIterator")
        if not iterator:
            raise ServiceError(
                "GetShardIterator answered without a ShardIterator",
                code="MalformedResponse",
                operation="GetShardIterator",
            )
        return str(iterator)

    def get_records(self, iterator: str, limit: int = 1000) -> RecordsPage:
        if not 1 <= limit <= 1000:
            raise ValidationError(f"limit {limit} is outside 1..1000", operation="GetRecords")
        payload = {"ShardIterator": iterator, "Limit": limit}
        # the body goes to parse_records as bytes: it is parsed inside its GC pause
        page: RecordsPage = self._call(self._streams, "GetRecords", payload, parse_records)
        return page

    def read_records(self, iterator: str, limit: int = 1000) -> PendingPage:
        if not 1 <= limit <= 1000:
            raise ValidationError(f"limit {limit} is outside 1..1000", operation="GetRecords")
        payload = {"ShardIterator": iterator, "Limit": limit}
        # the envelope is read in _send, so a body that is not JSON is retried there too
        head: PageHead = self._call(self._streams, "GetRecords", payload, PageHead)
        return PendingPage.of(head, head.next_iterator)

    def scan(
        self,
        table: str,
        segment: int,
        total_segments: int,
        exclusive_start_key: Mapping[str, Any] | None = None,
        limit: int | None = None,
    ) -> ScanPage:
        if not 0 <= segment < total_segments:
            raise ValidationError(
                f"segment {segment} is outside 0..{total_segments - 1}", operation="Scan"
            )
        # ConsistentRead: see StreamClient.scan (it doubles the read capacity consumed)
        payload: dict[str, Any] = {
            "TableName": table,
            "ReturnConsumedCapacity": "TOTAL",
            "ConsistentRead": True,
        }
        if total_segments > 1:
            payload["Segment"] = segment
            payload["TotalSegments"] = total_segments
        if exclusive_start_key:
            try:
                payload["ExclusiveStartKey"] = {
                    k: encode_value(v) for k, v in exclusive_start_key.items()
                }
            except DecodeError as exc:
                raise ValidationError(f"exclusive_start_key: {exc}", operation="Scan") from None
        if limit is not None:
            payload["Limit"] = limit
        return parse_scan(self._call(self._dynamodb, "Scan", payload))

    def close(self) -> None:
        """Close the pooled connections (the client is unusable afterwards)."""
        self._http.clear()

    def __repr__(self) -> str:  # no credentials here, on purpose
        where = self.endpoint_url or f"AWS {self.region}"
        return f"HttpStreamClient({where})"


def _iterator_request(
    stream_arn: str, shard_id: str, iterator_type: str, sequence: str | None
) -> dict[str, Any]:
    """The GetShardIterator payload, checked here so a bug fails with a clear message."""
    if iterator_type not in ITERATOR_TYPES:
        raise ValidationError(
            f"iterator type {iterator_type!r} is not one of {', '.join(ITERATOR_TYPES)}",
            operation="GetShardIterator",
        )
    payload: dict[str, Any] = {
        "StreamArn": stream_arn,
        "ShardId": shard_id,
        "ShardIteratorType": iterator_type,
    }
    if iterator_type.endswith("_SEQUENCE_NUMBER"):
        if not sequence or not sequence.isdigit():
            raise ValidationError(
                f"{iterator_type} needs a sequence number (digits), got {sequence!r}",
                operation="GetShardIterator",
            )
        payload["SequenceNumber"] = sequence
    return payload


def _error_from_response(
    action: str, status: int, data: bytes, request_id: str | None
) -> StreamError:
    """Map an error response to a typed exception: the JSON ``__type`` (text after ``#``)
    first, the HTTP status otherwise (moto answers some errors with an HTML 500 page)."""
    code: str | None = None
    message = ""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        kind = doc.get("__type") or doc.get("code") or ""
        code = str(kind).rsplit("#", 1)[-1] or None
        message = str(doc.get("message") or doc.get("Message") or "")
    if not message:
        text = data[:200].decode("utf-8", "replace")
        if "<title>" in text:
            text = text.split("<title>", 1)[1].split("</title>", 1)[0]
        message = text.strip() or "(empty response body)"
    cls = error_class_for(code, status)
    if code is None and cls is StreamError:
        code = f"HTTP{status}"
    return cls(message, code=code, operation=action, status=status, request_id=request_id)
