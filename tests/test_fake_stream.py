"""FakeStream behaves as its documentation says, so that other tests can trust it."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest

from viewkeeper.stream.client import StreamClient
from viewkeeper.stream.errors import (
    ExpiredIteratorError,
    ResourceNotFoundError,
    ServiceError,
    ThrottlingError,
    TrimmedDataAccessError,
    ValidationError,
)
from viewkeeper.stream.fake import FakeStream, ManualClock
from viewkeeper.stream.records import ChangeRecord, decode_record

T0 = 1_767_225_600.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def fake(clock: ManualClock) -> FakeStream:
    f = FakeStream(clock=clock)
    f.create_table("t", ("pk",), shards=1)
    return f


def read_shard(
    fake: FakeStream,
    shard_id: str,
    table: str = "t",
    how: str = "TRIM_HORIZON",
    sequence: str | None = None,
    limit: int = 1000,
    max_pages: int = 100,
) -> tuple[list[ChangeRecord], bool]:
    """Every record from ``how`` until an empty page (open shard) or SHARD_END; and whether
    SHARD_END was reached."""
    iterator: str | None = fake.get_shard_iterator(fake.stream_arn(table), shard_id, how, sequence)
    out: list[ChangeRecord] = []
    for _ in range(max_pages):
        assert iterator is not None
        page = fake.get_records(iterator, limit)
        out += page.records
        iterator = page.next_iterator
        if iterator is None:
            return out, True
        if not page.records:
            return out, False
    raise AssertionError("shard never ran dry")


def seqs(records: list[ChangeRecord]) -> list[int]:
    return [int(r.sequence) for r in records]


# --- writes become records ---------------------------------------------------------------------
def test_insert_modify_remove_with_both_images_and_creation_time(
    fake: FakeStream, clock: ManualClock
) -> None:
    fake.put_item("t", {"pk": "a", "n": 1, "tags": {"x"}, "b": b"\x00"})
    clock.advance(5)
    fake.update("t", {"pk": "a"}, {"n": Decimal("2.5")}, remove=["tags"])
    clock.advance(5)
    fake.delete_item("t", {"pk": "a"})
    (shard,) = fake.open_shards("t")
    records, ended = read_shard(fake, shard)
    assert not ended
    assert [r.event for r in records] == ["INSERT", "MODIFY", "REMOVE"]
    ins, mod, rem = records
    assert ins.keys == {"pk": "a"} and ins.old_image is None
    assert ins.new_image == {"pk": "a", "n": 1, "tags": {"x"}, "b": b"\x00"}
    assert mod.old_image == ins.new_image
    assert mod.new_image == {"pk": "a", "n": Decimal("2.5"), "b": b"\x00"}
    assert rem.new_image is None and rem.old_image == mod.new_image
    assert [r.created_at for r in records] == [T0, T0 + 5, T0 + 10]
    assert all(r.size_bytes > 0 for r in records)
    # the records went through the real decoder: raw is the wire form, replayable
    assert ins.raw is not None and ins.raw["dynamodb"]["NewImage"]["b"] == {"B": "AA=="}
    assert decode_record(ins.raw).new_image == ins.new_image
    assert fake.last_sequence == rem.sequence


def test_unchanged_writes_and_missing_deletes_emit_nothing(fake: FakeStream) -> None:
    fake.put_item("t", {"pk": "a", "v": 1})
    fake.put_item("t", {"pk": "a", "v": 1})  # same item: no record (DynamoDB; moto differs)
    fake.update("t", {"pk": "a"}, {"v": 1})
    fake.delete_item("t", {"pk": "zzz"})
    assert fake.record_count("t") == 1


def test_update_is_an_upsert(fake: FakeStream) -> None:
    assert fake.update("t", {"pk": "new"}, {"v": 1}) == {"pk": "new", "v": 1}
    (rec,) = read_shard(fake, fake.open_shards("t")[0])[0]
    assert rec.event == "INSERT"
    with pytest.raises(ValidationError, match="cannot remove key attribute pk"):
        fake.update("t", {"pk": "new"}, remove=["pk"])


@pytest.mark.parametrize(
    ("view_type", "new", "old"),
    [
        ("KEYS_ONLY", False, False),
        ("NEW_IMAGE", True, False),
        ("OLD_IMAGE", False, True),
        ("NEW_AND_OLD_IMAGES", True, True),
    ],
)
def test_stream_view_types(view_type: str, new: bool, old: bool) -> None:
    fake = FakeStream()
    fake.create_table("v", ("pk",), stream=view_type)
    fake.put_item("v", {"pk": "a", "x": 1})
    fake.put_item("v", {"pk": "a", "x": 2})
    _, mod = read_shard(fake, fake.open_shards("v")[0], table="v")[0]
    assert (mod.new_image is not None) == new
    assert (mod.old_image is not None) == old
    assert mod.keys == {"pk": "a"}
    assert fake.describe_table("v").stream_view_type == view_type


def test_items_are_validated_and_copied(fake: FakeStream) -> None:
    with pytest.raises(ValidationError, match="lacks key attribute"):
        fake.put_item("t", {"x": 1})
    with pytest.raises(ValueError, match="float"):
        fake.put_item("t", {"pk": "a", "x": 1.5})
    item: dict[str, Any] = {"pk": "a", "m": {"l": [1]}}
    fake.put_item("t", item)
    item["m"]["l"].append(2)  # the caller's object is not the stored one
    assert fake.get_item("t", {"pk": "a"}) == {"pk": "a", "m": {"l": [1]}}
    fake.items("t")[0]["m"]["l"].append(3)
    assert fake.contents("t") == {"a": {"pk": "a", "m": {"l": [1]}}}
    assert fake.get_item("t", {"pk": "nope"}) is None


def test_range_keys(clock: ManualClock) -> None:
    fake = FakeStream(clock=clock)
    info = fake.create_table("r", ("pk", "sk"))
    assert info.key_names == ("pk", "sk")
    fake.put_item("r", {"pk": "a", "sk": 2, "v": "x"})
    fake.put_item("r", {"pk": "a", "sk": 10, "v": "y"})
    assert set(fake.contents("r")) == {"a|2", "a|10"}
    (r1, r2) = read_shard(fake, fake.open_shards("r")[0], table="r")[0]
    assert (r1.keys, r2.keys) == ({"pk": "a", "sk": 2}, {"pk": "a", "sk": 10})


# --- sequence numbers ----------------------------------------------------------------------
def test_sequence_numbers_increase_strictly_across_a_digit_boundary() -> None:
    fake = FakeStream(first_sequence=10**21 - 5, sequence_gap=3)
    fake.create_table("t", ("pk",))
    for i in range(10):
        fake.put_item("t", {"pk": f"k{i}"})
    records, _ = read_shard(fake, fake.open_shards("t")[0])
    texts = [r.sequence for r in records]
    assert {len(t) for t in texts} == {21, 22}  # the boundary was crossed
    numbers = [int(t) for t in texts]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert sorted(texts) != texts  # comparing them as text would get the order wrong
    # and AFTER_SEQUENCE_NUMBER works across the boundary
    short = next(t for t in texts if len(t) == 21)
    after, _ = read_shard(
        fake, fake.open_shards("t")[0], how="AFTER_SEQUENCE_NUMBER", sequence=short
    )
    assert seqs(after) == [n for n in numbers if n > int(short)]


def test_default_sequence_numbers_have_21_digits(fake: FakeStream) -> None:
    fake.put_item("t", {"pk": "a"})
    (rec,) = read_shard(fake, fake.open_shards("t")[0])[0]
    assert len(rec.sequence) == 21


# --- shards: routing, lineage, splits, rollovers ------------------------------------------
def test_writes_are_spread_over_shards_by_key_and_stay_there() -> None:
    fake = FakeStream()
    fake.create_table("t", ("pk",), shards=4)
    for round_ in range(3):
        for i in range(40):
            fake.put_item("t", {"pk": f"k{i}", "round": round_})
    shards = fake.open_shards("t")
    assert len(shards) == 4
    owner: dict[str, str] = {}
    total = 0
    for shard in shards:
        records, _ = read_shard(fake, shard)
        total += len(records)
        for r in records:
            assert owner.setdefault(r.keys["pk"], shard) == shard  # one key, one shard
        assert seqs(records) == sorted(seqs(records))
    assert total == 120
    assert len(set(owner.values())) == 4  # every shard got some keys


def test_split_closes_the_parent_and_children_take_its_keys(fake: FakeStream) -> None:
    for i in range(20):
        fake.put_item("t", {"pk": f"k{i}", "v": 0})
    (parent,) = fake.open_shards("t")
    a, b = fake.split_shard(parent)
    for i in range(20):
        fake.put_item("t", {"pk": f"k{i}", "v": 1})
    listed = {s.shard_id: s for s in fake.list_shards(fake.stream_arn("t"))}
    assert list(listed) == [parent, a, b]  # parents before children
    p = listed[parent]
    assert p.closed and p.parent_shard_id is None and p.ending_sequence is not None
    for child in (listed[a], listed[b]):
        assert child.parent_shard_id == parent and not child.closed
        assert int(child.starting_sequence) > int(p.ending_sequence)
    old, ended = read_shard(fake, parent)
    assert ended and len(old) == 20 and all(r.new_image["v"] == 0 for r in old)  # type: ignore[index]
    assert max(seqs(old)) <= int(p.ending_sequence)
    new = read_shard(fake, a)[0] + read_shard(fake, b)[0]
    assert sorted(r.keys["pk"] for r in new) == sorted(f"k{i}" for i in range(20))
    assert read_shard(fake, a)[0] and read_shard(fake, b)[0]  # the range was really split
    with pytest.raises(ValidationError, match="already closed"):
        fake.split_shard(parent)


def test_rollover_and_close_all(fake: FakeStream) -> None:
    fake.put_item("t", {"pk": "a"})
    (first,) = fake.open_shards("t")
    second = fake.rollover(first)
    fake.put_item("t", {"pk": "a", "v": 2})
    assert fake.open_shards("t") == [second]
    fake.create_table("u", ("pk",), shards=2)
    new_ids = fake.close_all_and_rollover()
    assert len(new_ids) == 3 and set(fake.open_shards("t") + fake.open_shards("u")) == set(new_ids)
    lineage = {s.shard_id: s.parent_shard_id for s in fake.list_shards(fake.stream_arn("t"))}
    assert lineage == {first: None, second: first, new_ids[0]: second}
    assert [r.event for r in read_shard(fake, first)[0]] == ["INSERT"]
    assert [r.event for r in read_shard(fake, second)[0]] == ["MODIFY"]
    assert read_shard(fake, new_ids[0]) == ([], False)


def test_describe_stream_paginates_and_list_shards_follows(clock: ManualClock) -> None:
    fake = FakeStream(clock=clock, describe_page_size=2)
    fake.create_table("t", ("pk",), shards=3)
    for shard in fake.open_shards("t"):
        fake.rollover(shard)
    arn = fake.stream_arn("t")
    first = fake.describe_stream(arn)
    assert len(first.shards) == 2 and first.last_evaluated_shard_id == first.shards[-1].shard_id
    assert first.status == "ENABLED"
    shards = fake.list_shards(arn)
    assert len(shards) == 6 and len({s.shard_id for s in shards}) == 6
    assert fake.calls["describe_stream"] == 1 + 3
    position = {s.shard_id: i for i, s in enumerate(shards)}
    assert all(
        position[s.parent_shard_id] < position[s.shard_id] for s in shards if s.parent_shard_id
    )


# --- reading: pages, SHARD_END, iterator types ------------------------------------------------
@pytest.mark.parametrize(("end_with_last", "sizes"), [(True, [3, 3, 1]), (False, [3, 3, 1, 0])])
def test_page_size_is_honoured_and_a_closed_shard_ends_with_no_iterator(
    end_with_last: bool, sizes: list[int]
) -> None:
    fake = FakeStream(end_with_last_records=end_with_last)
    fake.create_table("t", ("pk",))
    for i in range(7):
        fake.put_item("t", {"pk": f"k{i}"})
    (shard,) = fake.open_shards("t")
    fake.rollover(shard)
    it: str | None = fake.get_shard_iterator(fake.stream_arn("t"), shard, "TRIM_HORIZON")
    got = []
    while it is not None:
        page = fake.get_records(it, limit=3)
        got.append(len(page.records))
        it = page.next_iterator
    assert got == sizes  # by default the page with the last records already says SHARD_END
    with pytest.raises(ValidationError, match=r"outside 1\.\.1000"):
        fake.get_records(fake.get_shard_iterator(fake.stream_arn("t"), shard, "LATEST"), 0)


def test_an_empty_closed_shard_ends_at_once_and_latest_on_it_too(fake: FakeStream) -> None:
    (shard,) = fake.open_shards("t")
    fake.rollover(shard)
    assert read_shard(fake, shard) == ([], True)
    assert read_shard(fake, shard, how="LATEST") == ([], True)


def test_an_open_shard_always_gives_a_next_iterator(fake: FakeStream) -> None:
    (shard,) = fake.open_shards("t")
    it = fake.get_shard_iterator(fake.stream_arn("t"), shard, "LATEST")
    page = fake.get_records(it)
    assert page.records == [] and page.next_iterator is not None and not page.shard_end
    fake.put_item("t", {"pk": "late"})
    page2 = fake.get_records(page.next_iterator)
    assert [r.keys["pk"] for r in page2.records] == ["late"]
    assert page.millis_behind is None


def test_bytes_limit_of_one_megabyte(fake: FakeStream) -> None:
    for i in range(5):
        fake.put_item("t", {"pk": f"k{i}", "blob": "x" * 300_000})
    it = fake.get_shard_iterator(fake.stream_arn("t"), fake.open_shards("t")[0], "TRIM_HORIZON")
    assert len(fake.get_records(it).records) == 3  # 3 x 300 kB fit in 1 MB, 4 do not


def test_iterator_types_and_reuse(fake: FakeStream) -> None:
    for i in range(5):
        fake.put_item("t", {"pk": f"k{i}"})
    (shard,) = fake.open_shards("t")
    everything, _ = read_shard(fake, shard)
    third = everything[2].sequence
    assert seqs(read_shard(fake, shard, "t", "AT_SEQUENCE_NUMBER", third)[0]) == seqs(
        everything[2:]
    )
    assert seqs(read_shard(fake, shard, "t", "AFTER_SEQUENCE_NUMBER", third)[0]) == seqs(
        everything[3:]
    )
    assert read_shard(fake, shard, "t", "LATEST")[0] == []
    it = fake.get_shard_iterator(fake.stream_arn("t"), shard, "TRIM_HORIZON")
    assert seqs(fake.get_records(it).records) == seqs(fake.get_records(it).records)  # reusable


@pytest.mark.parametrize(
    ("how", "sequence", "error", "match"),
    [
        ("SOMEWHERE", None, ValidationError, "iterator type 'SOMEWHERE'"),
        ("AT_SEQUENCE_NUMBER", None, ValidationError, "needs a sequence number"),
        ("AFTER_SEQUENCE_NUMBER", "12x", ValidationError, "needs a sequence number"),
        ("AT_SEQUENCE_NUMBER", "5", ValidationError, "is not in shard"),
    ],
)
def test_bad_iterator_requests(
    fake: FakeStream, how: str, sequence: str | None, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        fake.get_shard_iterator(fake.stream_arn("t"), fake.open_shards("t")[0], how, sequence)


def test_unknown_things(fake: FakeStream) -> None:
    arn = fake.stream_arn("t")
    with pytest.raises(ResourceNotFoundError):
        fake.get_shard_iterator(arn, "shardId-nope", "TRIM_HORIZON")
    with pytest.raises(ResourceNotFoundError):
        fake.describe_stream(arn + "x")
    with pytest.raises(ResourceNotFoundError):
        fake.describe_table("nope")
    with pytest.raises(ValidationError, match="Invalid ShardIterator"):
        fake.get_records("not-an-iterator")


# --- expiry ------------------------------------------------------------------------------------
def test_iterators_expire_after_their_age(clock: ManualClock) -> None:
    fake = FakeStream(clock=clock, iterator_max_age=900)
    fake.create_table("t", ("pk",))
    fake.put_item("t", {"pk": "a"})
    (shard,) = fake.open_shards("t")
    it = fake.get_shard_iterator(fake.stream_arn("t"), shard, "TRIM_HORIZON")
    clock.advance(899)
    page = fake.get_records(it)  # still valid; the next iterator is new: 900 s from now
    clock.advance(2)
    with pytest.raises(ExpiredIteratorError) as info:
        fake.get_records(it)
    assert info.value.code == "ExpiredIteratorException"
    assert page.next_iterator is not None
    assert fake.get_records(page.next_iterator).records == []
    clock.advance(901)
    with pytest.raises(ExpiredIteratorError):
        fake.get_records(page.next_iterator)


def test_expire_iterators_now(fake: FakeStream) -> None:
    (shard,) = fake.open_shards("t")
    old = fake.get_shard_iterator(fake.stream_arn("t"), shard, "TRIM_HORIZON")
    fake.expire_iterators()
    with pytest.raises(ExpiredIteratorError):
        fake.get_records(old)
    fresh = fake.get_shard_iterator(fake.stream_arn("t"), shard, "TRIM_HORIZON")
    assert fake.get_records(fresh).next_iterator is not None


# --- trimming ------------------------------------------------------------------------------
def test_trim_horizon_starts_at_the_oldest_kept_record(
    fake: FakeStream, clock: ManualClock
) -> None:
    for i in range(6):
        fake.put_item("t", {"pk": f"k{i}"})
        clock.advance(3600)
    (shard,) = fake.open_shards("t")
    before_trim, _ = read_shard(fake, shard)
    assert fake.trim(before=T0 + 3 * 3600) == 3
    kept, _ = read_shard(fake, shard)
    assert seqs(kept) == seqs(before_trim[3:])
    assert fake.record_count("t") == 3


def test_positions_in_trimmed_data_raise(fake: FakeStream, clock: ManualClock) -> None:
    for i in range(4):
        fake.put_item("t", {"pk": f"k{i}"})
        clock.advance(60)
    (shard,) = fake.open_shards("t")
    arn = fake.stream_arn("t")
    records, _ = read_shard(fake, shard)
    held = fake.get_shard_iterator(arn, shard, "AFTER_SEQUENCE_NUMBER", records[0].sequence)
    fake.trim(before=T0 + 120)  # drops records 0 and 1
    with pytest.raises(TrimmedDataAccessError) as info:
        fake.get_records(held)  # would skip record 1 silently
    assert info.value.code == "TrimmedDataAccessException"
    with pytest.raises(TrimmedDataAccessError):
        fake.get_shard_iterator(arn, shard, "AT_SEQUENCE_NUMBER", records[1].sequence)
    with pytest.raises(TrimmedDataAccessError):
        fake.get_shard_iterator(arn, shard, "AFTER_SEQUENCE_NUMBER", records[0].sequence)
    # right after the last trimmed record is fine: nothing is skipped
    rest, _ = read_shard(fake, shard, "t", "AFTER_SEQUENCE_NUMBER", records[1].sequence)
    assert seqs(rest) == seqs(records[2:])


def test_a_closed_shard_trimmed_empty_disappears(fake: FakeStream, clock: ManualClock) -> None:
    fake.put_item("t", {"pk": "a"})
    (parent,) = fake.open_shards("t")
    child = fake.rollover(parent)
    clock.advance(25 * 3600)
    fake.trim(before=clock() - 24 * 3600)
    shards = fake.list_shards(fake.stream_arn("t"))
    assert [(s.shard_id, s.parent_shard_id) for s in shards] == [(child, parent)]
    with pytest.raises(ResourceNotFoundError):
        fake.get_shard_iterator(fake.stream_arn("t"), parent, "TRIM_HORIZON")


# --- injected failures ---------------------------------------------------------------------
def test_inject_n_times_raises_fresh_exceptions(fake: FakeStream) -> None:
    fake.inject("describe_table", ThrottlingError("slow down"), times=2)
    raised = []
    for _ in range(2):
        with pytest.raises(ThrottlingError, match="slow down") as info:
            fake.describe_table("t")
        raised.append(info.value)
    assert raised[0] is not raised[1]
    assert fake.describe_table("t").name == "t"
    assert fake.calls["describe_table"] == 3


def test_read_records_is_get_records_in_two_halves(fake: FakeStream) -> None:
    """The call (and its injected errors) happens in read_records; the page it returns
    later is the one of that moment, even if the shard grew since."""
    for i in range(3):
        fake.put_item("t", {"pk": f"k{i}"})
    shard = fake.open_shards("t")[0]
    iterator = fake.get_shard_iterator(fake.stream_arn("t"), shard, "TRIM_HORIZON")
    fake.inject("get_records", ThrottlingError("slow down"))
    with pytest.raises(ThrottlingError):
        fake.read_records(iterator, 2)
    pending = fake.read_records(iterator, 2)
    fake.put_item("t", {"pk": "later"})
    assert pending.count == 2 and pending.size > 0
    page = pending.decode()
    assert [r.keys["pk"] for r in page.records] == ["k0", "k1"]
    assert fake.calls["get_records"] == 2
    assert page.next_iterator is not None
    rest = fake.get_records(page.next_iterator)
    assert [r.keys["pk"] for r in rest.records] == ["k2", "later"]


def test_inject_a_factory_and_clear(fake: FakeStream) -> None:
    fake.inject("scan", lambda: ServiceError("boom", status=500), times=None)
    for _ in range(3):
        with pytest.raises(ServiceError):
            fake.scan("t", 0, 1)
    fake.clear_injections()
    assert fake.scan("t", 0, 1).items == []
    with pytest.raises(ValueError, match="cannot inject into 'put_item'"):
        fake.inject("put_item", ThrottlingError())


def test_inject_with_probability_is_deterministic_per_seed() -> None:
    def pattern(seed: int) -> list[bool]:
        fake = FakeStream(seed=seed)
        fake.create_table("t", ("pk",))
        fake.inject("describe_table", ThrottlingError(), times=None, probability=0.3)
        out = []
        for _ in range(60):
            try:
                fake.describe_table("t")
                out.append(False)
            except ThrottlingError:
                out.append(True)
        return out

    a = pattern(7)
    assert a == pattern(7)
    assert 5 < sum(a) < 35
    assert a != pattern(8)


def test_list_shards_sees_describe_stream_injections(fake: FakeStream) -> None:
    fake.inject("describe_stream", ThrottlingError("LimitExceeded"), times=1)
    with pytest.raises(ThrottlingError):
        fake.list_shards(fake.stream_arn("t"))
    assert len(fake.list_shards(fake.stream_arn("t"))) == 1


# --- streams disabled, tables deleted --------------------------------------------------------
def test_disabling_a_stream(fake: FakeStream) -> None:
    fake.put_item("t", {"pk": "a"})
    arn = fake.stream_arn("t")
    (shard,) = fake.open_shards("t")
    fake.disable_stream("t")
    assert fake.describe_stream(arn).status == "DISABLED"
    info = fake.describe_table("t")
    assert info.stream_arn is None and info.stream_view_type is None
    fake.put_item("t", {"pk": "b"})  # stored, but no stream record anywhere
    assert fake.contents("t").keys() == {"a", "b"}
    records, ended = read_shard(fake, shard)  # the closed shard stays readable
    assert [r.keys["pk"] for r in records] == ["a"] and ended
    new_arn = fake.enable_stream("t")
    assert new_arn != arn and fake.describe_table("t").stream_arn == new_arn
    fake.put_item("t", {"pk": "c"})
    (new_shard,) = fake.open_shards("t")
    assert [r.keys["pk"] for r in read_shard(fake, new_shard)[0]] == ["c"]
    with pytest.raises(ValidationError):
        fake.enable_stream("t")


def test_deleting_a_table(fake: FakeStream) -> None:
    fake.put_item("t", {"pk": "a"})
    arn = fake.stream_arn("t")
    (shard,) = fake.open_shards("t")
    it = fake.get_shard_iterator(arn, shard, "TRIM_HORIZON")
    fake.delete_table("t")
    for call in (
        lambda: fake.describe_table("t"),
        lambda: fake.describe_stream(arn),
        lambda: fake.get_records(it),
        lambda: fake.get_shard_iterator(arn, shard, "LATEST"),
        lambda: fake.scan("t", 0, 1),
        lambda: fake.put_item("t", {"pk": "b"}),
        lambda: fake.delete_table("t"),
    ):
        with pytest.raises(ResourceNotFoundError):
            call()


def test_a_table_without_stream() -> None:
    fake = FakeStream()
    info = fake.create_table("plain", ("pk",), stream=None)
    assert info.stream_arn is None
    fake.put_item("plain", {"pk": "a"})
    with pytest.raises(ResourceNotFoundError):
        fake.stream_arn("plain")
    with pytest.raises(ValidationError, match="already exists"):
        fake.create_table("plain")


# --- scan ----------------------------------------------------------------------------------
def test_scan_segments_partition_the_table_and_paginate(fake: FakeStream) -> None:
    for i in range(50):
        fake.put_item("t", {"pk": f"k{i:02d}", "n": i})
    seen: list[str] = []
    for segment in range(4):
        start: dict[str, Any] | None = None
        pages = 0
        while True:
            page = fake.scan("t", segment, 4, start, limit=5)
            pages += 1
            assert len(page.items) <= 5 and page.consumed_capacity is not None
            seen += [i["pk"] for i in page.items]
            start = page.last_evaluated_key
            if start is None:
                break
            assert set(start) == {"pk"}
        assert pages >= 2
    assert sorted(seen) == [f"k{i:02d}" for i in range(50)]  # each item exactly once
    with pytest.raises(ValidationError, match=r"segment 4 is outside 0\.\.3"):
        fake.scan("t", 4, 4)


# --- concurrency and the interface ---------------------------------------------------------
def test_concurrent_writers_and_a_reader(fake: FakeStream) -> None:
    (shard,) = fake.open_shards("t")
    it: str | None = fake.get_shard_iterator(fake.stream_arn("t"), shard, "TRIM_HORIZON")
    got: list[ChangeRecord] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        for i in range(100):
            fake.put_item("t", {"pk": f"w{w}-{i % 10}", "i": i})

    def reader() -> None:
        # done on an empty page asked for after every writer finished (stop read *before*
        # the read: an empty page taken earlier says nothing about the last writes)
        nonlocal it
        while it is not None:
            writers_done = stop.is_set()
            page = fake.get_records(it, 37)
            got.extend(page.records)
            it = page.next_iterator
            if writers_done and not page.records:
                return

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join(timeout=30)
    assert not r.is_alive(), "the reader never saw the end of the records"
    assert it is not None  # an open shard always gives a next iterator
    assert len(got) == 400
    assert seqs(got) == sorted(set(seqs(got)))


def test_fake_is_a_stream_client() -> None:
    assert isinstance(FakeStream(), StreamClient)
