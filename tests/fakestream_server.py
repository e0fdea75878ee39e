"""The in-process :class:`~viewkeeper.stream.fake.FakeStream` served over HTTP, for tests
that run real ``viewkeeper`` processes against it.

Separate processes cannot share a FakeStream object, so this server speaks the DynamoDB
Streams / DynamoDB JSON protocol for it on 127.0.0.1, and forwards everything else
byte-for-byte to a moto server::

    fake = FakeStream()
    fake.create_table("sc", ("pk",), shards=24)
    with FakeStreamServer(fake, forward_url=moto_url) as server:
        # aws.endpoint_url: server.url in the viewkeeper config
        fake.put_item("sc", {...})        # the test keeps driving the fake directly

Served from the fake (``X-Amz-Target``):

- ``DynamoDBStreams_20120810.DescribeStream`` / ``GetShardIterator`` for a stream ARN of a
  table the fake has (or had), ``GetRecords`` for an iterator the fake issued;
- ``DynamoDB_20120810.DescribeTable`` / ``Scan`` for a table the fake has.

Everything else — the coordination table's DynamoDB calls, ``DescribeTable`` of tables the
fake does not have, GET requests, moto's own API — goes to ``forward_url`` unchanged (method,
path, headers, body) and moto's answer comes back unchanged (hop-by-hop headers aside).

Errors of the fake are answered as AWS does: ``{"__type": "com.amazonaws.dynamodb.v20120810#
Code", "message": ...}`` with HTTP 400 (500 for a :class:`ServiceError`), so
:func:`viewkeeper.stream.client._error_from_response` maps them to the same typed errors the
fake raises in-process. Records go out in wire form (the fake keeps them so: ``B`` as base64,
``N`` as strings, ``ApproximateCreationDateTime`` as epoch seconds); every 2xx answer carries
``x-amz-crc32`` as DynamoDB's does, so the client's checksum check runs too.

``python -m tests.fakestream_server --forward URL --table NAME:SHARDS`` serves a fresh fake
on its own (with ``POST /_fake/put`` and ``/_fake/split`` control endpoints), for poking at
it by hand.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import orjson

from viewkeeper.stream.errors import ResourceNotFoundError, ServiceError, StreamError
from viewkeeper.stream.fake import FakeStream
from viewkeeper.stream.records import DecodeError
from viewkeeper.stream.values import decode_image, encode_image

__all__ = ["FakeStreamServer", "error_body", "main"]

_STREAMS = "DynamoDBStreams_20120810"
_DYNAMODB = "DynamoDB_20120810"
_ERROR_PREFIX = "com.amazonaws.dynamodb.v20120810#"
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


def error_body(exc: BaseException) -> tuple[int, bytes]:
    """(HTTP status, JSON body) for an exception of the fake, as DynamoDB answers it."""
    if isinstance(exc, StreamError):
        status = exc.status or (500 if isinstance(exc, ServiceError) else 400)
        code, message = exc.code, exc.message
    elif isinstance(exc, DecodeError | KeyError | TypeError | ValueError):
        status, code, message = 400, "SerializationException", f"bad request: {exc}"
    else:
        status, code, message = 500, "InternalServerError", f"{type(exc).__name__}: {exc}"
    return status, orjson.dumps({"__type": _ERROR_PREFIX + code, "message": message})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that was killed (kill -9 in the tests) resets its connections: not news."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            return
        super().handle_error(request, client_address)


def _table_of_arn(arn: str) -> str | None:
    """``arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL`` → NAME."""
    _, _, rest = arn.partition(":table/")
    name, sep, _ = rest.partition("/stream/")
    return name if sep else None


class _Forwarder:
    """Per-thread keep-alive connections to the forward URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"forward_url must be http://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._local = threading.local()

    def _conn(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            self._local.conn = conn
        return conn

    def send(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        for attempt in (1, 2):
            conn = self._conn(fresh=attempt == 2)
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP:
                        conn.putheader(name, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                if resp.will_close:
                    conn.close()
                    self._local.conn = None
                return resp.status, out, data
            except (http.client.HTTPException, ConnectionError, OSError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class FakeStreamServer:
    """Serves ``fake`` on ``http://127.0.0.1:PORT`` (``url``); see the module doc.

    ``counts`` tallies requests by ``(route, action)`` with route ``fake`` or ``forward``.
    ``on_request``, if set, is called with ``(route, action, payload)`` before a fake request
    is served (payload is the decoded JSON body) — a hook for tests that watch traffic.
    """

    def __init__(
        self,
        fake: FakeStream,
        forward_url: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.fake = fake
        self.forwarder = _Forwarder(forward_url) if forward_url else None
        self.counts: Counter[tuple[str, str]] = Counter()
        self.on_request: Callable[[str, str, Mapping[str, Any]], None] | None = None
        self._counts_lock = threading.Lock()
        self._httpd = _Server((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> FakeStreamServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.name = "fakestream-server"
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeStreamServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- routing ------------------------------------------------------------------------
    def _has_table(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.fake.open_shards(name)  # cheap: raises ResourceNotFoundError when missing
        except ResourceNotFoundError:
            return False
        return True

    def _owns_arn(self, arn: object) -> bool:
        if not isinstance(arn, str):
            return False
        name = _table_of_arn(arn)
        if name is None or not self._has_table(name):
            return False
        # a moto table of the same name would have another ARN: the fake's end in .NNN
        return arn.rsplit("/stream/", 1)[-1].rsplit(".", 1)[-1].isdigit()

    def route(self, target: str, payload: Mapping[str, Any] | None) -> str | None:
        """The fake action to serve for this request, or None to forward it."""
        prefix, _, action = target.partition(".")
        if payload is None:
            return None
        if prefix == _STREAMS:
            if action in ("DescribeStream", "GetShardIterator"):
                return action if self._owns_arn(payload.get("StreamArn")) else None
            if action == "GetRecords":
                it = payload.get("ShardIterator")
                return action if isinstance(it, str) and "|fake-iterator|" in it else None
            return None
        if prefix == _DYNAMODB and action in ("DescribeTable", "Scan"):
            return action if self._has_table(payload.get("TableName")) else None
        return None

    def _count(self, route: str, action: str) -> None:
        with self._counts_lock:
            self.counts[(route, action)] += 1

    # --- the fake's answers -------------------------------------------------------------
    def serve(self, action: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one request from the fake (raises the fake's errors)."""
        if self.on_request is not None:
            self.on_request("fake", action, payload)
        handler = getattr(self, f"_do_{action}")
        result: dict[str, Any] = handler(payload)
        return result

    def _do_DescribeTable(self, p: Mapping[str, Any]) -> dict[str, Any]:
        info = self.fake.describe_table(p["TableName"])
        kinds = ("HASH", "RANGE")
        table: dict[str, Any] = {
            "TableName": info.name,
            "KeySchema": [
                {"AttributeName": n, "KeyType": kinds[i]} for i, n in enumerate(info.key_names)
            ],
            "AttributeDefinitions": [
                {"AttributeName": n, "AttributeType": "S"} for n in info.key_names
            ],
            "TableStatus": info.status,
            "ItemCount": info.item_count or 0,
            "StreamSpecification": {"StreamEnabled": info.stream_arn is not None},
        }
        if info.arn is not None:
            table["TableArn"] = info.arn
        if info.stream_arn is not None:
            table["StreamSpecification"]["StreamViewType"] = info.stream_view_type
            table["LatestStreamArn"] = info.stream_arn
            table["LatestStreamLabel"] = info.stream_arn.rsplit("/stream/", 1)[-1]
        return {"Table": table}

    def _do_DescribeStream(self, p: Mapping[str, Any]) -> dict[str, Any]:
        arn = p["StreamArn"]
        page = self.fake.describe_stream(arn, p.get("ExclusiveStartShardId"))
        shards = []
        for s in page.shards:
            rng: dict[str, str] = {"StartingSequenceNumber": s.starting_sequence}
            if s.ending_sequence is not None:
                rng["EndingSequenceNumber"] = s.ending_sequence
            shard: dict[str, Any] = {"ShardId": s.shard_id, "SequenceNumberRange": rng}
            if s.parent_shard_id is not None:
                shard["ParentShardId"] = s.parent_shard_id
            shards.append(shard)
        desc: dict[str, Any] = {
            "StreamArn": arn,
            "StreamLabel": arn.rsplit("/stream/", 1)[-1],
            "StreamStatus": page.status,
            "TableName": _table_of_arn(arn),
            "Shards": shards,
        }
        if page.last_evaluated_shard_id is not None:
            desc["LastEvaluatedShardId"] = page.last_evaluated_shard_id
        return {"StreamDescription": desc}

    def _do_GetShardIterator(self, p: Mapping[str, Any]) -> dict[str, Any]:
        it = self.fake.get_shard_iterator(
            p["StreamArn"], p["ShardId"], p["ShardIteratorType"], p.get("SequenceNumber")
        )
        return {"ShardIterator": it}

    def _do_GetRecords(self, p: Mapping[str, Any]) -> dict[str, Any]:
        page = self.fake.get_records(p["ShardIterator"], int(p.get("Limit", 1000)))
        # ``raw`` is the record exactly as the fake stored it: already the wire form
        out: dict[str, Any] = {"Records": [r.raw for r in page.records]}
        if page.next_iterator is not None:
            out["NextShardIterator"] = page.next_iterator
        return out

    def _do_Scan(self, p: Mapping[str, Any]) -> dict[str, Any]:
        start = p.get("ExclusiveStartKey")
        page = self.fake.scan(
            p["TableName"],
            int(p.get("Segment", 0)),
            int(p.get("TotalSegments", 1)),
            decode_image(start) if start else None,
            int(p["Limit"]) if "Limit" in p else None,
        )
        out: dict[str, Any] = {
            "Items": [encode_image(i) for i in page.items],
            "Count": len(page.items),
            "ScannedCount": len(page.items),
        }
        if page.last_evaluated_key is not None:
            out["LastEvaluatedKey"] = encode_image(page.last_evaluated_key)
        if page.consumed_capacity is not None:
            out["ConsumedCapacity"] = {
                "TableName": p["TableName"],
                "CapacityUnits": page.consumed_capacity,
            }
        return out

    # --- control endpoints (for the command line) ----------------------------------------
    def control(self, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /_fake/put`` {table, item (wire form)}, ``/_fake/delete`` {table, key},
        ``/_fake/split`` {shard_id}, ``/_fake/rollover`` {shard_id}, ``/_fake/contents``
        {table}: drive the fake from another process."""
        op = path.removeprefix("/_fake/")
        if op == "put":
            self.fake.put_item(payload["table"], decode_image(payload["item"]))
            return {}
        if op == "delete":
            self.fake.delete_item(payload["table"], decode_image(payload["key"]))
            return {}
        if op == "split":
            return {"children": list(self.fake.split_shard(payload["shard_id"]))}
        if op == "rollover":
            return {"child": self.fake.rollover(payload["shard_id"])}
        if op == "contents":
            items = self.fake.items(payload["table"])
            return {"Items": [encode_image(i) for i in items]}
        raise KeyError(f"unknown control endpoint {path}")

    # --- HTTP -----------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: urllib3 and botocore pool connections

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _answer(self, status: int, body: bytes, extra: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for name, value in extra:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, body: bytes) -> None:
                self._answer(
                    status,
                    body,
                    [
                        ("Content-Type", "application/x-amz-json-1.0"),
                        ("x-amzn-RequestId", uuid.uuid4().hex),
                        ("x-amz-crc32", str(zlib.crc32(body))),
                    ],
                )

            def _forward(self, body: bytes, action: str) -> None:
                server._count("forward", action)
                if server.forwarder is None:
                    status, data = error_body(
                        ResourceNotFoundError(f"no forward URL for {action} {self.path}")
                    )
                    self._json(status, data)
                    return
                try:
                    status, headers, data = server.forwarder.send(
                        self.command, self.path, list(self.headers.items()), body
                    )
                except OSError as exc:
                    status, data = error_body(ServiceError(f"forwarding failed: {exc}"))
                    self._answer(502, data, [("Content-Type", "application/x-amz-json-1.0")])
                    return
                self._answer(status, data, headers)

            def do_POST(self) -> None:
                body = self._body()
                if self.path.startswith("/_fake/"):
                    try:
                        out = server.control(self.path, orjson.loads(body or b"{}"))
                        self._json(200, orjson.dumps(out))
                    except Exception as exc:
                        self._json(*error_body(exc))
                    return
                target = self.headers.get("X-Amz-Target", "")
                payload: Any = None
                if target.startswith((_STREAMS + ".", _DYNAMODB + ".")):
                    try:
                        payload = orjson.loads(body)
                    except orjson.JSONDecodeError:
                        payload = None
                action = server.route(target, payload if isinstance(payload, dict) else None)
                if action is None:
                    self._forward(body, target.partition(".")[2] or self.path)
                    return
                server._count("fake", action)
                try:
                    out = server.serve(action, payload)
                except Exception as exc:
                    self._json(*error_body(exc))
                    return
                self._json(200, orjson.dumps(out))

            def do_GET(self) -> None:
                self._forward(self._body(), f"GET {self.path}")

            do_PUT = do_DELETE = do_HEAD = do_GET

        return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fresh FakeStream over HTTP.")
    parser.add_argument("--forward", help="moto's URL, for everything the fake does not serve")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--table", action="append", default=[], help="NAME:SHARDS (key attribute pk)"
    )
    args = parser.parse_args(argv)
    fake = FakeStream()
    for spec in args.table:
        name, _, shards = spec.partition(":")
        fake.create_table(name, ("pk",), shards=int(shards or 1))
    with FakeStreamServer(fake, args.forward, port=args.port) as server:
        print(server.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
