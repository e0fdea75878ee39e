"""The DynamoDB JSON decoder and ChangeRecord (viewkeeper.stream.records), and an item's id
(viewkeeper.projection.keys.encode_key)."""

from __future__ import annotations

import base64
import datetime as dt
from decimal import Decimal
from types import MappingProxyType
from typing import Any, cast

import orjson
import pytest
from boto3.dynamodb.types import Binary, TypeDeserializer, TypeSerializer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from viewkeeper.projection.keys import ItemKeyError, encode_key
from viewkeeper.stream.records import (
    NO_SEQUENCE,
    ChangeRecord,
    DecodeError,
    PageHead,
    decode_page,
    decode_record,
    decode_records,
)
from viewkeeper.stream.values import decode_image, decode_value, encode_image, encode_value

SEQ21 = "100000000000000000123"
SEQ40 = "9" * 40


# --- every attribute type --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("av", "expected"),
    [
        ({"S": "héllo | wörld"}, "héllo | wörld"),
        ({"S": ""}, ""),
        ({"N": "42"}, 42),
        ({"N": "0"}, 0),
        ({"N": "-17"}, -17),
        ({"N": "12345678901234567890123456789012345678"}, 12345678901234567890123456789012345678),
        ({"N": "1.50"}, Decimal("1.50")),
        ({"N": "-0.001"}, Decimal("-0.001")),
        ({"N": "1E+3"}, Decimal("1E+3")),
        ({"N": "1.5e-7"}, Decimal("1.5e-7")),
        ({"N": "-2E2"}, Decimal("-200")),
        ({"B": base64.b64encode(b"\x00\xffbin").decode()}, b"\x00\xffbin"),
        ({"B": b"\x00\xffraw"}, b"\x00\xffraw"),  # boto3's parsed form: already bytes
        ({"B": bytearray(b"ba")}, b"ba"),
        ({"B": ""}, b""),
        ({"SS": ["a", "b", "a"]}, {"a", "b"}),
        ({"NS": ["1", "2.5", "-3"]}, {1, Decimal("2.5"), -3}),
        ({"BS": [base64.b64encode(b"x").decode(), "eQ=="]}, {b"x", b"y"}),
        ({"BS": [b"x", b"y"]}, {b"x", b"y"}),
        ({"NULL": True}, None),
        ({"BOOL": True}, True),
        ({"BOOL": False}, False),
        ({"L": []}, []),
        (
            {"L": [{"S": "a"}, {"N": "1"}, {"NULL": True}, {"L": [{"BOOL": False}]}]},
            ["a", 1, None, [False]],
        ),
        ({"M": {}}, {}),
        (
            {"M": {"a": {"M": {"b": {"M": {"c": {"SS": ["x"]}}}}}, "n": {"N": "1.0"}}},
            {"a": {"b": {"c": {"x"}}}, "n": Decimal("1.0")},
        ),
    ],
)
def test_decode_value_of_every_type(av: dict[str, Any], expected: Any) -> None:
    got = decode_value(av)
    assert got == expected
    assert type(got) is type(expected)


def test_number_policy_int_when_integral_as_written_else_decimal() -> None:
    assert type(decode_value({"N": "10"})) is int
    assert type(decode_value({"N": "10.0"})) is Decimal  # not integral *as written*
    assert type(decode_value({"N": "1e1"})) is Decimal
    assert not any(type(v) is float for v in decode_value({"NS": ["1.5", "2", "3e0"]}))


def test_decode_image_accepts_any_mapping_and_decodes_each_attribute() -> None:
    image = MappingProxyType({"pk": {"S": "a"}, "n": {"N": "3"}})
    assert decode_image(image) == {"pk": "a", "n": 3}


# --- errors say what is wrong and where -----------------------------------------------------
@pytest.mark.parametrize(
    ("image", "message"),
    [
        ({"a": {"X": "1"}}, "a: unknown DynamoDB attribute type 'X'; expected one of S, N"),
        ({"a": {"S": "x", "N": "1"}}, "a: attribute value"),
        ({"a": {}}, "a: attribute value {} must be a map with exactly one type key"),
        ({"a": "plain"}, "a: attribute value 'plain' must be a map"),
        ({"a": {"S": 5}}, "a: S value 5 is not a string"),
        ({"a": {"N": "abc"}}, "a: N value 'abc' is not a number"),
        ({"a": {"N": "1.2.3"}}, "a: N value '1.2.3' is not a number"),
        ({"a": {"N": "NaN"}}, "a: N value 'NaN' is not a number"),
        ({"a": {"N": "Infinity"}}, "a: N value 'Infinity' is not a number"),
        ({"a": {"N": "\uff11\uff12"}}, "a: N value"),  # fullwidth digits: not ASCII
        ({"a": {"N": 1.5}}, "a: N value 1.5 is not a string of digits"),
        ({"a": {"B": "not base64!"}}, "a: B value 'not base64!' is not valid base64"),
        ({"a": {"B": 5}}, "a: B value of type int is neither bytes nor base64 text"),
        ({"a": {"BOOL": "true"}}, "a: BOOL value 'true' is not true or false"),
        ({"a": {"SS": "abc"}}, "a: SS value 'abc' is not a list"),
        ({"a": {"SS": ["a", 1]}}, "a: SS member 1 is not a string"),
        ({"a": {"L": {"S": "x"}}}, "a: L value"),
        ({"a": {"M": ["x"]}}, "a: M value ['x'] is not a map"),
        ({"a": {"M": {"b": {"L": [{"S": "ok"}, {"Q": 1}]}}}}, "a.b[1]: unknown DynamoDB"),
        ({"a": {"L": [{"M": {"c": {"N": "x"}}}]}}, "a[0].c: N value 'x'"),
    ],
)
def test_malformed_values_raise_decode_error_with_path(image: Any, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_image(image)
    assert str(info.value).startswith(message), str(info.value)


def test_decode_error_carries_path_and_reason() -> None:
    with pytest.raises(DecodeError) as info:
        decode_image({"lines": {"L": [{"S": "a"}, {"M": {"qty": {"N": "?"}}}]}})
    assert info.value.path == ("lines", 1, "qty")
    assert info.value.reason == "N value '?' is not a number"
    assert isinstance(info.value, ValueError)


def test_an_image_that_is_not_a_map_is_refused() -> None:
    with pytest.raises(DecodeError, match="is not a map of attribute values"):
        decode_image([("a", {"S": "x"})])  # type: ignore[arg-type]


# --- records: wire form, Lambda form, boto3 form ---------------------------------------------
def wire_record(
    event: str = "MODIFY", sequence: str = SEQ21, created: Any = 1_767_225_600.25
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ApproximateCreationDateTime": created,
        "Keys": {"pk": {"S": "o-1"}, "sk": {"N": "7"}},
        "SequenceNumber": sequence,
        "SizeBytes": 321,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if event != "REMOVE":
        body["NewImage"] = {
            "pk": {"S": "o-1"},
            "sk": {"N": "7"},
            "total": {"N": "12.50"},
            "blob": {"B": base64.b64encode(b"\x01\x02").decode()},
            "tags": {"SS": ["a", "b"]},
            "nested": {"M": {"l": {"L": [{"N": "1"}, {"BS": ["AQ=="]}]}}},
        }
    if event != "INSERT":
        body["OldImage"] = {"pk": {"S": "o-1"}, "sk": {"N": "7"}, "total": {"N": "10"}}
    return {
        "eventID": "c81e728d9d4c2f636f067f89cc14862c",
        "eventName": event,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": body,
    }


def as_lambda_event_record(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    out["eventSourceARN"] = (
        "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2026-01-01T00:00:00.000"
    )
    return out


def as_boto3_parsed(rec: dict[str, Any]) -> dict[str, Any]:
    """What boto3's dynamodbstreams client returns: datetime and raw bytes."""
    out: dict[str, Any] = orjson.loads(orjson.dumps(rec))
    body = out["dynamodb"]
    body["ApproximateCreationDateTime"] = dt.datetime.fromtimestamp(
        body["ApproximateCreationDateTime"], dt.UTC
    )

    def unb64(image: dict[str, Any]) -> None:
        for av in image.values():
            ((tag, value),) = av.items()
            if tag == "B":
                av["B"] = base64.b64decode(value)
            elif tag == "BS":
                av["BS"] = [base64.b64decode(v) for v in value]
            elif tag == "M":
                unb64(value)
            elif tag == "L":
                unb64(dict(enumerate(value)))  # type: ignore[arg-type]

    for name in ("Keys", "NewImage", "OldImage"):
        if name in body:
            unb64(body[name])
    return out


def test_wire_lambda_and_boto3_forms_decode_to_the_same_record() -> None:
    wire = wire_record()
    from_wire = decode_records(orjson.loads(orjson.dumps({"Records": [wire]}))["Records"])[0]
    from_lambda = decode_record(as_lambda_event_record(wire))
    from_boto3 = decode_record(as_boto3_parsed(wire))
    for rec in (from_wire, from_lambda, from_boto3):
        assert rec.event == "MODIFY"
        assert rec.sequence == SEQ21
        assert rec.keys == {"pk": "o-1", "sk": 7}
        assert rec.new_image == {
            "pk": "o-1",
            "sk": 7,
            "total": Decimal("12.50"),
            "blob": b"\x01\x02",
            "tags": {"a", "b"},
            "nested": {"l": [1, {b"\x01"}]},
        }
        assert rec.old_image == {"pk": "o-1", "sk": 7, "total": 10}
        assert rec.created_at == pytest.approx(1_767_225_600.25)
        assert rec.size_bytes == 321
    assert from_lambda.raw is not None and "eventSourceARN" in from_lambda.raw


@pytest.mark.parametrize("event", ["INSERT", "MODIFY", "REMOVE"])
def test_images_present_per_event(event: str) -> None:
    rec = decode_record(wire_record(event))
    assert rec.event == event
    assert (rec.new_image is None) == (event == "REMOVE")
    assert (rec.old_image is None) == (event == "INSERT")


def test_sequence_numbers_of_40_digits_stay_exact_text() -> None:
    rec = decode_record(wire_record(sequence=SEQ40))
    assert rec.sequence == SEQ40
    assert int(rec.sequence) == 10**40 - 1  # no float rounding anywhere
    assert "seq=" + SEQ40 in repr(rec)


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        (1_767_225_600, 1_767_225_600.0),
        (Decimal("1767225600.5"), 1_767_225_600.5),
        (None, 0.0),
    ],
)
def test_creation_time_forms(created: Any, expected: float) -> None:
    rec = wire_record()
    if created is None:
        del rec["dynamodb"]["ApproximateCreationDateTime"]
    else:
        rec["dynamodb"]["ApproximateCreationDateTime"] = created
    assert decode_record(rec).created_at == expected


SHAPE = "expected {eventName, dynamodb: {Keys, SequenceNumber, NewImage, ...}}"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("eventName"), f"record {SEQ21} lacks eventName; {SHAPE}"),
        (
            lambda r: r.pop("dynamodb"),
            "record with eventID 'c81e728d9d4c2f636f067f89cc14862c' lacks dynamodb",
        ),
        (lambda r: r.update(dynamodb=None), "record with eventID 'c81e728d9d4c2f636f067f89cc14"),
        (lambda r: r["dynamodb"].pop("Keys"), f"record {SEQ21} lacks dynamodb.Keys"),
        (
            lambda r: (r["dynamodb"].pop("SequenceNumber"), r.pop("eventID")),
            "change record lacks dynamodb.SequenceNumber",
        ),
        (lambda r: r.update(eventName="UPSERT"), f"record {SEQ21}: eventName 'UPSERT' is not"),
        (lambda r: r["dynamodb"].update(SequenceNumber=123), "record with eventID 'c81e728d9"),
        (lambda r: r["dynamodb"].update(SequenceNumber="12a"), "record 12a: SequenceNumber '12a'"),
        (
            lambda r: r["dynamodb"].update(ApproximateCreationDateTime="yesterday"),
            f"record {SEQ21}: ApproximateCreationDateTime 'yesterday' is neither",
        ),
        (lambda r: r["dynamodb"].update(SizeBytes="big"), f"record {SEQ21}: SizeBytes 'big'"),
        (
            lambda r: r["dynamodb"]["NewImage"].update(x={"Y": 1}),
            f"record {SEQ21}: NewImage.x: unknown DynamoDB attribute type 'Y'",
        ),
        (
            lambda r: r["dynamodb"]["Keys"].update(pk={"S": None}),
            f"record {SEQ21}: Keys.pk: S value None is not a string",
        ),
        (
            lambda r: r["dynamodb"].update(NewImage=["x"]),
            f"record {SEQ21}: NewImage: image ['x'] is not a map of attribute values",
        ),
    ],
)
def test_malformed_records_raise_clear_decode_errors(mutate: Any, message: str) -> None:
    rec = wire_record()
    mutate(rec)
    with pytest.raises(DecodeError) as info:
        decode_record(rec)
    assert str(info.value).startswith(message), str(info.value)
    assert "NoneType" not in str(info.value) and "\n" not in str(info.value)


def test_a_record_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(DecodeError, match="change record \\['not', 'a', 'record'\\] is not a map"):
        decode_record(["not", "a", "record"])  # type: ignore[arg-type]


def test_old_image_is_decoded_lazily_and_once() -> None:
    rec = wire_record()
    rec["dynamodb"]["OldImage"]["bad"] = {"Q": "unknown type"}
    decoded = decode_record(rec)  # the malformed old image is not even looked at yet
    assert decoded._old_image is None
    with pytest.raises(DecodeError, match=f"record {SEQ21}: OldImage.bad: unknown DynamoDB"):
        _ = decoded.old_image

    good = decode_record(wire_record())
    first = good.old_image
    assert first is good.old_image  # cached, not decoded again


def test_hand_built_change_record_and_numbers_already_decoded() -> None:
    rec = ChangeRecord("INSERT", SEQ21, {"pk": "a"}, {"pk": "a"}, None, 0.0, 0, None)
    assert rec.old_image is None and rec.raw is None
    assert decode_value({"N": 5}) == 5
    assert decode_value({"N": Decimal("1.5")}) == Decimal("1.5")


# --- a page with malformed records (decode_records) -----------------------------------------
def test_decode_records_marks_a_malformed_record_invalid_instead_of_failing_the_page() -> None:
    unknown = wire_record(sequence="1" + "0" * 19 + "2")
    unknown["dynamodb"]["NewImage"]["x"] = {"X": "1"}
    no_keys = wire_record(sequence="1" + "0" * 19 + "3")
    del no_keys["dynamodb"]["Keys"]
    bad_event = wire_record(event="UPSERT", sequence="1" + "0" * 19 + "4")
    no_seq = wire_record()
    del no_seq["dynamodb"]["SequenceNumber"]
    bad_seq = wire_record(sequence="12ab")
    unhashable_event = wire_record()
    unhashable_event["eventName"] = ["INSERT"]  # must be a DecodeError, not a TypeError
    page: list[Any] = [
        wire_record(),
        unknown,
        no_keys,
        bad_event,
        no_seq,
        bad_seq,
        unhashable_event,
        "not a record",
        None,
        wire_record(event="INSERT"),
    ]
    decoded = decode_records(orjson.loads(orjson.dumps(page)))
    assert len(decoded) == len(page)  # one per record, in order
    first, *bad, last = decoded
    assert first.invalid is None and last.invalid is None and last.event == "INSERT"
    assert all(r.invalid for r in bad), bad
    assert [r.sequence for r in bad] == [
        "1" + "0" * 19 + "2",
        "1" + "0" * 19 + "3",
        "1" + "0" * 19 + "4",
        NO_SEQUENCE,  # none: cannot be ordered
        NO_SEQUENCE,  # not a decimal string
        SEQ21,
        NO_SEQUENCE,
        NO_SEQUENCE,
    ]
    by_seq = {r.sequence: r for r in bad}
    assert "NewImage.x" in str(by_seq["1" + "0" * 19 + "2"].invalid)
    assert "'X'" in str(by_seq["1" + "0" * 19 + "2"].invalid)
    assert "Keys" in str(by_seq["1" + "0" * 19 + "3"].invalid)
    assert "UPSERT" in str(by_seq["1" + "0" * 19 + "4"].invalid)
    assert "eventName ['INSERT']" in str(bad[5].invalid)
    # what the dead letter needs: the raw record, and the keys when they decode
    assert [r.raw for r in bad[:6]] == page[1:7]
    assert bad[0].keys == {"pk": "o-1", "sk": 7} and bad[1].keys == {}
    assert bad[6].raw == {"malformed": "not a record"} and bad[7].raw == {"malformed": None}
    assert bad[0].new_image is None and bad[0].old_image is None
    assert bad[0].created_at == 1_767_225_600.25 and bad[6].created_at == 0.0
    assert "invalid" in repr(bad[0])


def test_decode_records_turns_an_unexpected_decoder_error_into_an_invalid_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the decoder (an exception other than DecodeError) must not stall a shard
    either: the record is marked invalid, naming the exception, and dead-lettered."""
    import viewkeeper.stream.records as records

    real = records.decode_record

    def flaky(rec: Any) -> ChangeRecord:
        if rec["dynamodb"]["SequenceNumber"] == SEQ40:
            raise RecursionError("maximum recursion depth exceeded")
        return real(rec)

    monkeypatch.setattr(records, "decode_record", flaky)
    ok, boom = decode_records([wire_record(), wire_record(sequence=SEQ40)])
    assert ok.invalid is None
    assert boom.sequence == SEQ40 and boom.invalid is not None
    assert f"record {SEQ40}" in boom.invalid and "RecursionError" in boom.invalid


_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
_json = st.recursive(
    _scalars | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
_paths = st.sampled_from(
    [
        ("eventName",),
        ("dynamodb",),
        ("dynamodb", "Keys"),
        ("dynamodb", "SequenceNumber"),
        ("dynamodb", "ApproximateCreationDateTime"),
        ("dynamodb", "SizeBytes"),
        ("dynamodb", "NewImage"),
        ("dynamodb", "NewImage", "total"),
        ("dynamodb", "NewImage", "nested", "M", "l"),
        ("dynamodb", "Keys", "sk"),
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(path=_paths, value=_json)
def test_decode_records_never_raises_on_a_damaged_record(path: tuple[str, ...], value: Any) -> None:
    """Whatever JSON replaces a part of a record, the page decodes: the record is either
    valid or marked invalid with a message; the records around it are untouched."""
    rec: Any = wire_record()
    target = rec
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    page = orjson.loads(orjson.dumps([wire_record(), rec, wire_record()]))
    before, got, after = decode_records(page)
    assert before.invalid is None and after.invalid is None
    if got.invalid is not None:
        assert got.invalid.strip() and got.raw == page[1]
        assert got.sequence in (SEQ21, NO_SEQUENCE)


# --- decode_page: the typed fast path must agree with the general one -------------------------
def _fields(rec: ChangeRecord) -> tuple[Any, ...]:
    try:
        old: Any = rec.old_image
    except DecodeError as exc:
        old = ("DecodeError", str(exc))
    event = rec.event if rec.invalid is None else None  # meaningless when invalid
    return (
        event,
        rec.sequence,
        rec.keys,
        rec.new_image,
        old,
        rec.created_at,
        rec.size_bytes,
        rec.raw,
        rec.invalid,
    )


def _assert_same_page(records: list[Any]) -> list[ChangeRecord]:
    body = orjson.dumps({"Records": records, "NextShardIterator": "next-it"})
    fast, next_it = decode_page(body)
    slow = decode_records(orjson.loads(body)["Records"])
    assert next_it == "next-it"
    assert [_fields(r) for r in fast] == [_fields(r) for r in slow]
    return fast


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=_paths
    | st.sampled_from([("dynamodb", "OldImage"), ("dynamodb", "OldImage", "total"), ("x",)]),
    value=_json,
)
def test_decode_page_agrees_with_decode_records_on_damaged_records(
    path: tuple[str, ...], value: Any
) -> None:
    """Whatever part of a record is replaced, the msgspec path of a GetRecords body gives the
    same records, errors and raw records as orjson + decode_records."""
    rec: Any = wire_record()
    target = rec
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    _assert_same_page([wire_record(), rec, wire_record(event="REMOVE")])


def test_decode_page_on_every_event_kind_and_odd_envelopes() -> None:
    insert, remove = wire_record(event="INSERT"), wire_record(event="REMOVE")
    null_old = wire_record()
    null_old["dynamodb"]["OldImage"] = None
    int_time = wire_record(created=1_767_225_600)
    no_time = wire_record()
    del no_time["dynamodb"]["ApproximateCreationDateTime"]
    text_size = wire_record()
    text_size["dynamodb"]["SizeBytes"] = "321"
    seq40 = wire_record(sequence=SEQ40)
    got = _assert_same_page(
        [wire_record(), insert, remove, null_old, int_time, no_time, text_size, seq40, "x", None]
    )
    assert [r.invalid is None for r in got] == [True] * 8 + [False] * 2
    modify = got[0]
    assert modify.keys == {"pk": "o-1", "sk": 7}
    assert modify.old_image == {"pk": "o-1", "sk": 7, "total": 10}
    assert got[1].old_image is None and got[2].new_image is None
    assert got[3].old_image is None and got[5].created_at == 0.0
    assert got[7].sequence == SEQ40
    assert modify.raw == wire_record()  # the record as it came, eventID and all


def test_decode_page_bodies_without_records_and_bodies_that_are_not_json() -> None:
    assert decode_page(b"{}") == ([], None)
    assert decode_page(b'{"Records": null, "NextShardIterator": null}') == ([], None)
    assert decode_page(b'{"Records": []}') == ([], None)
    with pytest.raises(orjson.JSONDecodeError):
        decode_page(b'{"Records": [')
    records, _ = decode_page(b'{"Records": {"not": "a list"}, "NextShardIterator": "n"}')
    # the general path's reading, as before: a mapping is iterated as its keys, each one an
    # invalid record (dead-lettered), never an exception that would stall the shard
    assert [r.invalid for r in records] == [
        "change record 'not' is not a map; expected {eventName, dynamodb: {Keys, "
        "SequenceNumber, NewImage, ...}}"
    ]


# --- encode_key --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("item", "names", "expected"),
    [
        ({"pk": "o-1"}, ("pk",), "o-1"),
        ({"pk": "o-1", "sk": 2}, ("pk", "sk"), "o-1|2"),
        ({"sk": 2, "pk": "o-1"}, ("pk", "sk"), "o-1|2"),  # schema order, not item order
        ({"pk": "a|b"}, ("pk",), "a\\|b"),
        ({"pk": "a\\b"}, ("pk",), "a\\\\b"),
        ({"pk": "a\\|", "sk": "|"}, ("pk", "sk"), "a\\\\\\||\\|"),
        ({"pk": 10}, ("pk",), "10"),
        ({"pk": Decimal("10.00")}, ("pk",), "10"),
        ({"pk": Decimal("1E+2")}, ("pk",), "100"),
        ({"pk": Decimal("1.50")}, ("pk",), "1.5"),
        ({"pk": Decimal("-0.000001")}, ("pk",), "-0.000001"),
        ({"pk": b"\x00\x01"}, ("pk",), "AAE="),
    ],
)
def test_encode_key(item: dict[str, Any], names: tuple[str, ...], expected: str) -> None:
    assert encode_key(item, names) == expected


def test_encode_key_numbers_are_canonical_whatever_their_decoded_form() -> None:
    forms = [decode_value({"N": t}) for t in ("100", "100.0", "1E+2", "1.00e2")]
    assert {encode_key({"k": v}, ("k",)) for v in forms} == {"100"}


def test_encode_key_errors() -> None:
    with pytest.raises(ItemKeyError, match="item lacks key attribute 'sk'"):
        encode_key({"pk": "a"}, ("pk", "sk"))
    with pytest.raises(ItemKeyError, match="cannot be BOOL"):
        encode_key({"pk": True}, ("pk",))
    with pytest.raises(ItemKeyError, match="is not a string, number or binary"):
        encode_key({"pk": [1]}, ("pk",))


_key_part = st.one_of(st.text(alphabet="ab|\\", max_size=6), st.integers(-5, 5))


@given(a=st.tuples(_key_part, _key_part), b=st.tuples(_key_part, _key_part))
def test_encode_key_is_injective(a: tuple[Any, Any], b: tuple[Any, Any]) -> None:
    """Two different keys never share an id, even with ``|`` and ``\\`` in strings."""
    ka = encode_key({"h": a[0], "r": a[1]}, ("h", "r"))
    kb = encode_key({"h": b[0], "r": b[1]}, ("h", "r"))
    same_values = a == b and [type(x) for x in a] == [type(x) for x in b]
    if same_values:
        assert ka == kb
    elif ka == kb:  # only a string and a number with the same text may collide
        assert [str(x) for x in a] == [str(x) for x in b]


# --- round trips against boto3's serializer/deserializer ---------------------------------
_numbers = st.one_of(
    st.integers(min_value=-(10**38) + 1, max_value=10**38 - 1),
    st.decimals(
        allow_nan=False, allow_infinity=False, places=4, min_value=-(10**20), max_value=10**20
    ),
)
_scalars = st.one_of(
    st.text(max_size=20),
    _numbers,
    st.binary(max_size=16),
    st.booleans(),
    st.none(),
)
_values = st.recursive(
    _scalars
    | st.sets(st.text(max_size=8), min_size=1, max_size=4)
    | st.sets(st.integers(-1000, 1000), min_size=1, max_size=4)
    | st.sets(st.binary(min_size=1, max_size=4), min_size=1, max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _to_wire(av: Any) -> Any:
    """boto3's TypeSerializer output (raw bytes) → wire form (base64 text), recursively."""
    if isinstance(av, dict) and len(av) == 1:
        ((tag, value),) = av.items()
        if tag == "B":
            return {"B": base64.b64encode(bytes(value)).decode()}
        if tag == "BS":
            return {"BS": [base64.b64encode(bytes(v)).decode() for v in value]}
        if tag == "M":
            return {"M": {k: _to_wire(v) for k, v in value.items()}}
        if tag == "L":
            return {"L": [_to_wire(v) for v in value]}
    return av


def _plain(value: Any) -> Any:
    """boto3's Binary → bytes, so that values compare with ours."""
    if isinstance(value, Binary):
        return bytes(cast(Any, value).value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, set):
        return {_plain(v) for v in value}
    return value


def _types_follow_policy(value: Any) -> bool:
    if isinstance(value, float):
        return False
    if isinstance(value, dict):
        return all(_types_follow_policy(v) for v in value.values())
    if isinstance(value, list | set):
        return all(_types_follow_policy(v) for v in value)
    return True


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_values)
def test_round_trip_against_boto3_type_serializer(value: Any) -> None:
    serialized = TypeSerializer().serialize(value)
    boto3_value = _plain(TypeDeserializer().deserialize(serialized))
    for form in (
        serialized,
        _to_wire(serialized),
        orjson.loads(orjson.dumps(_to_wire(serialized))),
    ):
        ours = decode_value(form)
        assert ours == boto3_value  # boto3 gives Decimal for every N; ours int when integral
        assert ours == value
        assert _types_follow_policy(ours)


@settings(max_examples=200)
@given(_values)
def test_encode_value_is_the_inverse_of_decode_value(value: Any) -> None:
    wire = orjson.loads(orjson.dumps(encode_value(value)))
    assert decode_value(wire) == value
    # and it is what boto3 would store
    assert _plain(TypeDeserializer().deserialize(_from_wire(wire))) == value


def _from_wire(av: Any) -> Any:
    ((tag, value),) = av.items()
    if tag == "B":
        return {"B": base64.b64decode(value)}
    if tag == "BS":
        return {"BS": [base64.b64decode(v) for v in value]}
    if tag == "M":
        return {"M": {k: _from_wire(v) for k, v in value.items()}}
    if tag == "L":
        return {"L": [_from_wire(v) for v in value]}
    return av


def test_encode_refuses_what_dynamodb_cannot_store() -> None:
    with pytest.raises(DecodeError, match=r"float 1\.5 is not supported"):
        encode_value(1.5)
    with pytest.raises(DecodeError, match="empty set"):
        encode_value(set())
    with pytest.raises(DecodeError, match="mixes types"):
        encode_value({"a", 1})
    with pytest.raises(DecodeError, match="not a finite number"):
        encode_value(Decimal("NaN"))
    with pytest.raises(DecodeError, match="cannot encode object"):
        encode_value(object())
    assert encode_image({"a": 1, "b": {"x"}}) == {"a": {"N": "1"}, "b": {"SS": ["x"]}}


def test_page_head_reads_the_envelope_and_defers_the_records() -> None:
    """What the read-ahead thread learns before any record is decoded: the count, the next
    iterator and the body's size, on the typed path, on the general one, and for an already
    decoded page (the records' SizeBytes then)."""
    records = [wire_record(), wire_record(event="REMOVE"), "x"]
    body = orjson.dumps({"Records": records, "NextShardIterator": "next-it"})
    head = PageHead(body)
    assert (head.count, head.next_iterator, head.size) == (3, "next-it", len(body))
    assert [_fields(r) for r in head.records()] == [_fields(r) for r in decode_page(body)[0]]

    odd = b'{"Records": {"not": "a list"}, "NextShardIterator": 7}'  # the general path
    head = PageHead(odd)
    assert (head.count, head.next_iterator, head.size) == (0, "7", len(odd))
    assert len(head.records()) == 1 and head.records()[0].invalid

    decoded = {"Records": [wire_record(), wire_record()], "NextShardIterator": None}
    head = PageHead(decoded)
    sizes = [r["dynamodb"].get("SizeBytes", 0) for r in decoded["Records"]]
    assert (head.count, head.next_iterator, head.size) == (2, None, sum(sizes))

    for not_an_object in (b"[]", b'"text"', b"12"):
        with pytest.raises(orjson.JSONDecodeError):
            PageHead(not_an_object)
