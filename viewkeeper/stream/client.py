"""Reading DynamoDB Streams (and scanning DynamoDB) over plain HTTP.

:class:`StreamClient` is the interface the shard worker, the supervisor and the rebuild are
written against; :class:`HttpStreamClient` speaks to AWS (or moto), and
:class:`viewkeeper.stream.fake.FakeStream` is an in-process twin for the behaviours moto lacks
(shard lineage, rollover, iterator expiry, trimming — DESIGN.md §7).

Why not boto3's client: botocore's response parser costs about 100 µs per stream record
(DESIGN.md §8) — more than everything else viewkeeper does with a record. Here the body of
a GetRecords response goes through :class:`~viewkeeper.stream.records.PageHead` only
(msgspec, orjson). boto3 is still used for what it is good at: credentials and region are
resolved by a ``boto3.Session`` (environment, profiles, SSO, instance/container roles;
refreshable credentials refresh themselves) and every request is signed with botocore's
``SigV4Auth``.

Errors become the typed exceptions of :mod:`viewkeeper.stream.errors`. Throttling, 5xx and
connection failures are retried here (tenacity, full-jitter exponential backoff, bounded);
expired iterators, trimmed data and missing resources are not: the caller must decide.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable
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

from viewkeeper.stream.errors import (
    AccessDeniedError,
    ConnectionFailedError,
    ServiceError,
    StreamError,
    ValidationError,
    error_class_for,
)
from viewkeeper.stream.records import ChangeRecord, DecodeError, PageHead
from viewkeeper.stream.values import decode_image, encode_value

if TYPE_CHECKING:
    import boto3

__all__ = [
    "ITERATOR_TYPES",
    "HttpStreamClient",
    "IteratorType",
    "PendingPage",
    "RecordsPage",
    "ScanPage",
    "ShardInfo",
    "StreamClient",
    "StreamPage",
    "TableInfo",
    "gc_paused",
    "parse_records",
    "parse_scan",
    "parse_stream",
    "parse_table",
]

log = logging.getLogger("viewkeeper.stream.client")

IteratorType = Literal["TRIM_HORIZON", "LATEST", "AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"]
ITERATOR_TYPES: tuple[str, ...] = (
    "TRIM_HORIZON",
    "LATEST",
    "AT_SEQUENCE_NUMBER",
    "AFTER_SEQUENCE_NUMBER",
)


# --- the data the interface speaks ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TableInfo:
    """What DescribeTable says about a source table.

    ``key_names`` is the key schema in order (hash, then range), as :func:`encode_key` wants
    it. ``stream_arn`` is None when the table has no *enabled* stream (a disabled stream's
    ARN is still reported by DynamoDB, but nothing new will ever arrive on it). ``arn`` is
    the table's own ARN (account and region included: the source's identity).
    """

    name: str
    key_names: tuple[str, ...]
    stream_arn: str | None
    stream_view_type: str | None
    status: str
    item_count: int | None = None
    arn: str | None = None


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One shard of a stream. ``ending_sequence`` is set once the shard is closed: it will
    still yield its remaining records, then SHARD_END."""

    shard_id: str
    parent_shard_id: str | None
    starting_sequence: str
    ending_sequence: str | None = None

    @property
    def closed(self) -> bool:
        return self.ending_sequence is not None


@dataclass(frozen=True, slots=True)
class StreamPage:
    """One DescribeStream page. ``status`` is ENABLED, ENABLING, DISABLED or DISABLING;
    ``last_evaluated_shard_id`` is None on the last page."""

    status: str
    shards: list[ShardInfo]
    last_evaluated_shard_id: str | None = None


@dataclass(frozen=True, slots=True)
class RecordsPage:
    """One GetRecords page. ``next_iterator`` None means SHARD_END: the shard is closed and
    every record has been returned. ``millis_behind`` is always None for DynamoDB Streams
    (it has no lag figure; use now - ``created_at`` of the last record). ``records`` holds
    one entry per record of the response, malformed ones included (marked ``invalid``)."""

    records: list[ChangeRecord]
    next_iterator: str | None
    millis_behind: int | None = None
    size: int = 0  # bytes of the response body (0: not known)

    @property
    def shard_end(self) -> bool:
        return self.next_iterator is None


class PendingPage:
    """A GetRecords answer whose records are not decoded yet (:meth:`StreamClient.read_records`):
    how many there are, the next iterator and the body's size are known; :meth:`decode`
    builds the :class:`RecordsPage`, in whichever thread calls it."""

    __slots__ = ("_records", "count", "next_iterator", "size")

    def __init__(
        self,
        count: int,
        next_iterator: str | None,
        size: int,
        records: Callable[[], list[ChangeRecord]],
    ) -> None:
        self.count = count
        self.next_iterator = next_iterator
        self.size = size
        self._records = records

    @classmethod
    def of(cls, head: PageHead, next_iterator: str | None) -> PendingPage:
        return cls(head.count, next_iterator, head.size, head.records)

    def decode(self) -> RecordsPage:
        with gc_paused():
            records = self._records()
        return RecordsPage(records, self.next_iterator, size=self.size)


@dataclass(frozen=True, slots=True)
class ScanPage:
    """One Scan page: items and ``last_evaluated_key`` as plain Python values (decoded like
    stream images); pass ``last_evaluated_key`` back as ``exclusive_start_key``, None means
    the segment is done. ``consumed_capacity`` in capacity units, when reported."""

    items: list[dict[str, Any]]
    last_evaluated_key: dict[str, Any] | None
    consumed_capacity: float | None = None


@runtime_checkable
class StreamClient(Protocol):
    """What viewkeeper needs from DynamoDB and DynamoDB Streams.

    Implementations are thread-safe: the supervisor calls one client from every worker
    thread. Every method raises only :class:`~viewkeeper.stream.errors.StreamError`
    subclasses for service failures. A stream record that is not valid DynamoDB JSON does not
    raise: :meth:`get_records` returns it in its place, marked
    :attr:`~viewkeeper.stream.records.ChangeRecord.invalid`, for the pipeline to dead-letter.
    """

    def describe_table(self, table: str) -> TableInfo:
        """The key schema and current stream of ``table`` (ResourceNotFoundError if none)."""
        ...

    def describe_stream(
        self, stream_arn: str, exclusive_start_shard_id: str | None = None
    ) -> StreamPage:
        """One page of the stream's shards, after ``exclusive_start_shard_id``."""
        ...

    def list_shards(self, stream_arn: str) -> list[ShardInfo]:
        """Every shard of the stream, following DescribeStream's pagination (parents are
        listed before their children, as DynamoDB does)."""
        shards: list[ShardInfo] = []
        seen: set[str] = set()
        start: str | None = None
        while True:
            page = self.describe_stream(stream_arn, start)
            for shard in page.shards:
                if shard.shard_id not in seen:
                    seen.add(shard.shard_id)
                    shards.append(shard)
            nxt = page.last_evaluated_shard_id
            if nxt is None:
                return shards
            if nxt == start:
                raise ServiceError(
                    f"DescribeStream returned LastEvaluatedShardId {nxt} twice; the shard "
                    "list would never end",
                    code="PaginationLoop",
                    operation="DescribeStream",
                )
            start = nxt

    def get_shard_iterator(
        self,
        stream_arn: str,
        shard_id: str,
        iterator_type: str,
        sequence: str | None = None,
    ) -> str:
        """An iterator for ``shard_id``: ``iterator_type`` is one of :data:`ITERATOR_TYPES`;
        ``sequence`` is required for AT_/AFTER_SEQUENCE_NUMBER. Iterators expire after
        15 minutes (ExpiredIteratorError from get_records)."""
        ...

    def get_records(self, iterator: str, limit: int = 1000) -> RecordsPage:
        """Up to ``limit`` (≤ 1000) records from ``iterator``, decoded."""
        ...

    def read_records(self, iterator: str, limit: int = 1000) -> PendingPage:
        """:meth:`get_records` in two halves: the call now (its errors, a body that is not
        JSON included, raised here) and the envelope read — how many records, the next
        iterator —, the records' decode when :meth:`PendingPage.decode` is called. The
        shard worker reads ahead with it: the wait for the service overlaps the current
        page in a helper thread, and the next call can leave before this page is decoded,
        while the decode — CPU work, which would only fight for the GIL — stays in the
        worker's thread. This default makes the whole call now."""
        page = self.get_records(iterator, limit)
        return PendingPage(len(page.records), page.next_iterator, page.size, lambda: page.records)

    def scan(
        self,
        table: str,
        segment: int,
        total_segments: int,
        exclusive_start_key: Mapping[str, Any] | None = None,
        limit: int | None = None,
    ) -> ScanPage:
        """One page of a parallel scan of ``table`` (segment ``segment`` of
        ``total_segments``), for the rebuild: a strongly consistent read (the rebuild's
        argument needs every item as of after the handshake; an eventually consistent
        Scan may return one from before a write the stream already delivered)."""
        ...


# --- parsing responses (pure functions: the benchmarks and tests call them directly) -------
def parse_table(data: Mapping[str, Any]) -> TableInfo:
    """A DescribeTable response (already JSON-decoded) → :class:`TableInfo`."""
    table = data["Table"]
    schema = table.get("KeySchema") or []
    hash_names = [k["AttributeName"] for k in schema if k.get("KeyType") == "HASH"]
    range_names = [k["AttributeName"] for k in schema if k.get("KeyType") == "RANGE"]
    spec = table.get("StreamSpecification") or {}
    enabled = bool(spec.get("StreamEnabled"))
    count = table.get("ItemCount")
    return TableInfo(
        name=table["TableName"],
        key_names=tuple(hash_names + range_names),
        stream_arn=table.get("LatestStreamArn") if enabled else None,
        stream_view_type=spec.get("StreamViewType") if enabled else None,
        status=table.get("TableStatus", "ACTIVE"),
        item_count=int(count) if count is not None else None,
        arn=table.get("TableArn"),
    )


def parse_stream(data: Mapping[str, Any]) -> StreamPage:
    """A DescribeStream response (JSON-decoded) → :class:`StreamPage`."""
    desc = data["StreamDescription"]
    shards = []
    for s in desc.get("Shards") or ():
        rng = s.get("SequenceNumberRange") or {}
        shards.append(
            ShardInfo(
                shard_id=s["ShardId"],
                parent_shard_id=s.get("ParentShardId"),
                starting_sequence=rng.get("StartingSequenceNumber", ""),
                ending_sequence=rng.get("EndingSequenceNumber"),
            )
        )
    return StreamPage(
        status=desc.get("StreamStatus", "ENABLED"),
        shards=shards,
        last_evaluated_shard_id=desc.get("LastEvaluatedShardId"),
    )


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False
_gc_paused_at = 0.0
_GC_MAX_PAUSE = 1.0  # seconds of back-to-back pauses (many threads) before a forced pass


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector off while a page is parsed and decoded.

    Why: a 1000-record page allocates ~150,000 containers in one burst, all alive until the
    page is decoded. The collector, triggered by allocation counts, would traverse that
    young, acyclic tree again and again and promote it into full collections: measured,
    that doubles the cost of the whole parse path (``bench/decode.py``). Reference counting
    still frees everything; only the cycle search waits until the burst is over (the same
    technique as Mercurial's ``util.nogc``).

    Safe with threads: pauses nest through a counter, the collector comes back on when the
    last one ends (only if it was on before), and if pauses from many threads keep it off
    for more than a second, a young-generation pass is forced so garbage stays bounded.
    """
    global _gc_depth, _gc_was_enabled, _gc_paused_at
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            _gc_paused_at = time.monotonic()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0:
                if _gc_was_enabled:
                    gc.enable()
            elif time.monotonic() - _gc_paused_at > _GC_MAX_PAUSE:
                _gc_paused_at = time.monotonic()
                gc.collect(1)


def parse_records(body: bytes | Mapping[str, Any], *, pause_gc: bool = True) -> RecordsPage:
    """A GetRecords response body (bytes, or already JSON-decoded) → :class:`RecordsPage`.

    This is the hot path measured by ``bench/decode.py``: :class:`PageHead` (a typed
    msgspec parse and the hand-written decoder of :mod:`viewkeeper.stream.records`), nothing
    else, under :func:`gc_paused` unless ``pause_gc`` is False. A malformed record does not
    fail the page: it comes back marked ``invalid`` (:func:`decode_records`).
    """
    with gc_paused() if pause_gc else nullcontext():
        head = PageHead(body)
        records = head.records()
    return RecordsPage(records, head.next_iterator, size=head.size)


def parse_scan(data: Mapping[str, Any]) -> ScanPage:
    """A Scan response (JSON-decoded) → :class:`ScanPage` with decoded items."""
    items = [decode_image(i) for i in data.get("Items") or ()]
    last = data.get("LastEvaluatedKey")
    consumed = (data.get("ConsumedCapacity") or {}).get("CapacityUnits")
    return ScanPage(
        items=items,
        last_evaluated_key=decode_image(last) if last else None,
        consumed_capacity=float(consumed) if consumed is not None else None,
    )


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
