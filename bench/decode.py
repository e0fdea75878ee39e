"""Decode: GetRecords page bodies → change records, ours vs boto3's.

Ours is exactly what :class:`~viewkeeper.stream.http.HttpStreamClient` does with a response
body: :func:`~viewkeeper.stream.client.parse_records` (``decode_page``: a typed msgspec
parse that builds objects for Keys and NewImage only, + the decoder of
``viewkeeper.stream.records``). The baseline is what a boto3 consumer pays: botocore's own
JSON response parser with the ``dynamodbstreams`` GetRecords output shape (the code a
``boto3.client("dynamodbstreams").get_records()`` call runs on the body), then
``boto3.dynamodb.types.TypeDeserializer`` on Keys, NewImage and OldImage.

The target (≥ 5x) is on the first row: what the client's parse path delivers, change
records with keys and new image decoded and the old image decoded lazily (no view reads it
on the hot path). The second row also decodes every old image, the like-for-like comparison
with the baseline; the third shows the first without the collector pause of
:func:`~viewkeeper.stream.client.gc_paused`, to show what that pause is worth.

Every variant runs in its own fresh interpreter with the same modules loaded and the same
pages (``bench.common.isolated``), under the same conditions: default garbage collector (its
cost, driven by the objects a page allocates, is part of the price), a full collection
before each round, the best of N rounds, CPU time. Each round decodes the pages one after
the other and drops each result, as a shard worker does.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from bench.common import PAGE_RECORDS, Row, best_of, isolated, make_pages, measure_main, rate

TARGET = 5.0


def _ours(pages: list[bytes], old_images: bool, pause_gc: bool = True) -> Callable[[], None]:
    from viewkeeper.stream.client import parse_records

    def run_ours() -> None:
        for body in pages:
            page = parse_records(body, pause_gc=pause_gc)
            for rec in page.records:
                _ = rec.new_image
                if old_images:
                    _ = rec.old_image

    return run_ours


def _botocore_parse() -> Callable[[bytes], Any]:
    """botocore's GetRecords response parsing, as a boto3 dynamodbstreams client runs it."""
    import botocore.parsers
    import botocore.session

    model = botocore.session.get_session().get_service_model("dynamodbstreams")
    shape = model.operation_model("GetRecords").output_shape
    assert shape is not None
    parser = botocore.parsers.create_parser("json")

    def parse(body: bytes) -> Any:
        return parser.parse({"body": body, "headers": {}, "status_code": 200}, shape)

    return parse


def _baseline(pages: list[bytes]) -> Callable[[], None]:
    from boto3.dynamodb.types import TypeDeserializer

    parse = _botocore_parse()
    deserialize = TypeDeserializer().deserialize

    def run_baseline() -> None:
        for body in pages:
            for rec in parse(body)["Records"]:
                d = rec["dynamodb"]
                {k: deserialize(v) for k, v in d["Keys"].items()}
                if "NewImage" in d:
                    {k: deserialize(v) for k, v in d["NewImage"].items()}
                if "OldImage" in d:
                    {k: deserialize(v) for k, v in d["OldImage"].items()}

    return run_baseline


def _check_equal(pages: list[bytes]) -> None:
    """Both sides must produce the same values, or the comparison means nothing."""
    from boto3.dynamodb.types import TypeDeserializer

    from viewkeeper.stream.client import parse_records

    des = TypeDeserializer()
    ours = parse_records(pages[0]).records
    for mine, theirs in zip(ours, _botocore_parse()(pages[0])["Records"], strict=True):
        body = theirs["dynamodb"]
        new = {k: des.deserialize(v) for k, v in body.get("NewImage", {}).items()} or None
        old = {k: des.deserialize(v) for k, v in body.get("OldImage", {}).items()} or None
        if (mine.new_image, mine.old_image) != (new, old):  # int == Decimal for equal values
            raise AssertionError(f"decoders disagree on record {mine.sequence}")
        if mine.sequence != body["SequenceNumber"]:
            raise AssertionError("sequence numbers differ")


PAGES = 5  # the same in --quick: fewer pages would flatter the baseline (less GC pressure)


def _measure(variant: str) -> Callable[[int], float]:
    """records/s of one variant, measured in this process (see :func:`bench.common.isolated`)."""

    def measure(repeat: int) -> float:
        import boto3  # noqa: F401 - both sides run with the same modules loaded, as the daemon

        import viewkeeper.stream.client  # noqa: F401

        pages = make_pages(PAGES)
        fn = {
            "baseline": lambda: _baseline(pages),
            "lazy": lambda: _ours(pages, old_images=False),
            "full": lambda: _ours(pages, old_images=True),
            "no_pause": lambda: _ours(pages, old_images=False, pause_gc=False),
        }[variant]()
        return rate(len(pages) * PAGE_RECORDS, best_of(fn, repeat))

    return measure


VARIANTS = ("baseline", "lazy", "full", "no_pause")


def run(args: argparse.Namespace) -> list[Row]:
    repeat = 2 if getattr(args, "quick", False) else 5
    pages = make_pages(1)
    _check_equal(pages)
    size = len(pages[0]) / PAGE_RECORDS
    got = {v: isolated("bench.decode", v, repeat) for v in VARIANTS}
    base = got["baseline"]
    return [
        Row.compare(
            f"decode: GetRecords page -> ChangeRecords ({size:,.0f} B/rec)",
            got["lazy"],
            "rec/s",
            base,
            TARGET,
        ),
        Row.compare("decode: same, every old image decoded too", got["full"], "rec/s", base, None),
        Row.compare("decode: same as first, GC pause off", got["no_pause"], "rec/s", base, None),
    ]


if __name__ == "__main__":
    measure_main({v: _measure(v) for v in VARIANTS})
