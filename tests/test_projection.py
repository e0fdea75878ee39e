"""Projection and encoding units: JSON encoding of entry values (viewkeeper.sinks.encoding),
document ids and error messages of project(), and what the view decorators record and
load_views refuses (viewkeeper.projection). No service is needed."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viewkeeper import opensearch_view, redis_view
from viewkeeper.projection.api import View, declarations, view_of
from viewkeeper.projection.project import ProjectionError, project
from viewkeeper.projection.registry import ViewLoadError, load_views
from viewkeeper.sinks.encoding import EncodeError, dumps, redis_value


def _loads(raw: bytes) -> Any:
    """JSON back to Python with exact numbers (the stdlib keeps big ints exact)."""
    return json.loads(raw, parse_float=Decimal)


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


# --- encoding: what is written -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"n": 10**37 + 1}, b'{"n":10000000000000000000000000000000000001}'),
        ({"n": -(10**30)}, b'{"n":-1000000000000000000000000000000}'),
        (-(10**38) + 1, b"-" + b"9" * 38),
        ([1, 2**64, [2**70]], b"[1,18446744073709551616,[1180591620717411303424]]"),
        ({"s": {2**70, 1}}, b'{"s":[1,1180591620717411303424]}'),  # sorted like any set
        ({2**70: "k"}, b'{"1180591620717411303424":"k"}'),  # a key, as orjson writes int keys
        ({"n": 2**64 - 1, "m": -(2**63)}, b'{"n":18446744073709551615,"m":-9223372036854775808}'),
        ({"v": None, "s": "null", "t": "NaN"}, b'{"v":null,"s":"null","t":"NaN"}'),
        ({"d": Decimal("12.50"), "e": Decimal("1E+5")}, b'{"d":12.50,"e":1E+5}'),
        ({"b": b"hi", "set": {"b", "a"}}, b'{"b":"aGk=","set":["a","b"]}'),
        ({"t": (1, 2.5, True)}, b'{"t":[1,2.5,true]}'),
    ],
)
def test_values_are_written_exactly(value: Any, expected: bytes) -> None:
    assert dumps(value) == expected


def test_an_int_subclass_beyond_64_bits_is_written_as_its_digits() -> None:
    class Weird(int):
        def __str__(self) -> str:
            return "not a number"

    assert dumps({"n": Weird(10**30)}) == b'{"n":1000000000000000000000000000000}'


def test_a_float_subclass_is_written_as_a_float() -> None:
    class F(float):
        pass

    assert dumps({"f": F(1.5)}) == b'{"f":1.5}'
    with pytest.raises(EncodeError, match=r"'f'.*nan"):
        dumps({"f": F("nan")})


def test_a_dataclass_holding_a_big_int_or_a_nan() -> None:
    @dataclasses.dataclass
    class Point:
        x: Any
        y: int = 0

    assert dumps([Point(10**20)]) == b'[{"x":100000000000000000000,"y":0}]'
    with pytest.raises(EncodeError, match=r"field '\[0\]\.x'.*nan"):
        dumps([Point(float("nan"))])


def test_redis_values_str_and_bytes_are_verbatim() -> None:
    assert redis_value("x\ud800") == "x\ud800".encode("utf-8", "surrogatepass")
    assert redis_value(b"\x00raw") == b"\x00raw"
    assert redis_value(10**37) == b"1" + b"0" * 37


# --- encoding: what is refused, naming the field, the value and the fix ---------------------

REFUSED: list[tuple[str, Any, list[str]]] = [
    # (case, value, what the message must say)
    ("float nan", {"ratio": float("nan")}, ["'ratio'", "nan", "null", "finite"]),
    ("float inf in a list", {"a": [1.0, float("inf")]}, ["'a[1]'", "inf"]),
    ("float -inf top level", float("-inf"), ["the value", "-inf"]),
    ("nested nan", {"a": {"b": [1, {"c": float("nan")}]}}, ["'a.b[1].c'", "nan"]),
    ("nan next to None", {"v": None, "w": float("nan")}, ["'w'", "nan"]),
    ("nan in a set", {"s": {float("nan")}}, ["'s{…}'", "nan"]),
    ("Decimal NaN", {"total": Decimal("NaN")}, ["'total'", "Decimal('NaN')", "finite"]),
    ("Decimal sNaN", {"t": [Decimal("sNaN")]}, ["'t[0]'", "sNaN"]),
    ("Decimal Infinity", {"t": Decimal("-Infinity")}, ["'t'", "Infinity"]),
    ("Decimal NaN in a set", {"s": {Decimal(1), Decimal("NaN")}}, ["'s{…}'", "NaN"]),
    ("object", {"obj": Opaque()}, ["'obj'", "Opaque", "<Opaque>", "return str"]),
    ("object deep", {"a": [{"b": Opaque()}]}, ["'a[0].b'", "Opaque"]),
    ("object, odd key", {"my key": Opaque()}, ["\"['my key']\"", "Opaque"]),
    ("float nan key", {float("nan"): 1}, ["[nan]", "key", "str keys"]),
    ("tuple key", {(1, 2): 3}, ["[(1, 2)]", "tuple", "str keys"]),
    ("lone surrogate", {"s": "a\udc80b"}, ["'s'", "surrogate", "UTF-8"]),
    ("object next to a big int", {"n": 10**30, "o": Opaque()}, ["'o'", "Opaque"]),
]


@pytest.mark.parametrize(
    ("value", "must_say"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_what_json_cannot_hold_is_refused_naming_the_field(value: Any, must_say: list[str]) -> None:
    with pytest.raises(EncodeError) as caught:
        dumps(value)
    message = str(caught.value)
    assert message.startswith("cannot encode"), message
    for words in must_say:
        assert words in message, message
    assert "\n" not in message
    assert isinstance(caught.value, ValueError)  # what the Redis sink catches as well


def test_long_values_and_paths_are_cut_in_the_message() -> None:
    with pytest.raises(EncodeError) as caught:
        dumps({"k" * 5000: [Opaque()], "x": "y" * 10_000})
    assert len(str(caught.value)) < 600, str(caught.value)
    deep: list[Any] = []
    deep.append(deep)  # contains itself
    with pytest.raises(EncodeError, match="levels deep") as caught:
        dumps({"loop": deep})
    assert len(str(caught.value)) < 600


def test_a_nan_hidden_by_a_repr_that_fails_is_still_named() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    with pytest.raises(EncodeError, match=r"'b'.*Broken.*repr failed"):
        dumps({"b": Broken()})


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**38) + 1, max_value=10**38 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"))
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_every_json_value_round_trips_with_exact_numbers(value: Any) -> None:
    def exact(v: Any) -> Any:  # what json.loads(parse_float=Decimal) gives back
        if isinstance(v, float):
            return Decimal(repr(v)) if v == v else v
        if isinstance(v, list):
            return [exact(x) for x in v]
        if isinstance(v, dict):
            return {k: exact(x) for k, x in v.items()}
        return v

    assert _loads(dumps(value)) == exact(value)


@settings(max_examples=200, deadline=None)
@given(_values, st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_a_nonfinite_float_anywhere_is_refused(value: Any, bad: float) -> None:
    holder = {"inner": [value, {"x": bad}]}
    with pytest.raises(EncodeError, match=r"'inner\[1\]\.x'"):
        dumps(holder)


# --- project(): document ids and message sizes ---------------------------------------------


def _doc_view(doc_id: Callable[[dict[str, Any]], str] | None = None) -> View:
    def doc(item: dict[str, Any]) -> dict[str, Any]:
        return {"pk": item["pk"]}

    view = view_of(
        opensearch_view(table="t", opensearch="search", index="docs", doc_id=doc_id)(doc)
    )
    assert view is not None
    return view


def test_a_default_id_over_512_bytes_names_its_size_and_the_fix_without_the_whole_key() -> None:
    key = "k" * 2048
    with pytest.raises(ProjectionError) as caught:
        project(_doc_view(), {"pk": key}, key, ("pk",))
    message = str(caught.value)
    assert "item key of 2048 bytes exceeds OpenSearch's 512-byte _id" in message, message
    assert "doc_id=" in message
    assert "k" * 100 in message and "k" * 101 not in message, message
    assert "(2048 characters)" in message
    assert caught.value.item_key == key  # the whole key is kept for the dead letter


def test_a_default_id_counts_bytes_not_characters() -> None:
    key = "é" * 300  # 600 bytes
    with pytest.raises(ProjectionError, match="item key of 600 bytes"):
        project(_doc_view(), {"pk": key}, key, ("pk",))
    ok = "é" * 256  # 512 bytes: fits
    assert project(_doc_view(), {"pk": ok}, ok, ("pk",))[0].ident == ("D", ok, "")


def test_a_doc_id_function_returning_too_long_or_no_str() -> None:
    long_view = _doc_view(lambda item: "x" * 600)
    with pytest.raises(ProjectionError) as caught:
        project(long_view, {"pk": "a"}, "a", ("pk",))
    message = str(caught.value)
    assert "doc_id= returned" in message and "600 bytes" in message and "512" in message
    assert "x" * 101 not in message
    not_a_str: Any = lambda item: 42  # noqa: E731
    with pytest.raises(ProjectionError, match=r"doc_id= returned 42; it must return a non-empty"):
        project(_doc_view(not_a_str), {"pk": "a"}, "a", ("pk",))
    (doc,) = project(_doc_view(lambda item: "id-" + item["pk"]), {"pk": "a"}, "a", ("pk",))
    assert doc.ident == ("D", "id-a", "")


def test_projection_errors_cut_long_keys_and_exception_texts() -> None:
    def card(item: dict[str, Any]) -> Any:
        raise KeyError("m" * 5000)

    view = view_of(redis_view(table="t", redis="cache")(card))
    assert view is not None
    key = "z" * 2048
    with pytest.raises(ProjectionError) as caught:
        project(view, {"pk": key}, key, ("pk",))
    message = str(caught.value)
    assert "KeyError" in message and len(message) < 1400, len(message)
    assert "z" * 101 not in message
    short = ProjectionError(view, "short-key", "x")
    assert "on item 'short-key': x" in str(short)


# --- the decorators -------------------------------------------------------------------------


def test_a_bare_decorator_names_the_fix() -> None:
    def card(item: dict[str, Any]) -> Any:
        return None

    with pytest.raises(TypeError, match=r"write @redis_view\(table=\.\.\., redis=\.\.\.\)"):
        redis_view(card)
    with pytest.raises(TypeError, match=r"write @opensearch_view\(table=\.\.\., opensearch="):
        opensearch_view(card)
    with pytest.raises(TypeError, match=r"redis_view\(\) is missing redis=; write @redis_view\("):
        redis_view(table="t")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"missing opensearch=, index="):
        opensearch_view(table="t")  # type: ignore[call-overload]


# --- view modules: every declaration recorded, a name declared twice refused ----------------

HEADER = "from viewkeeper import opensearch_view, redis_view\n\n"


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``write(source) -> module name``: a fresh view module in a folder on sys.path."""
    names: list[str] = []
    sys.path.insert(0, str(tmp_path))

    def write(source: str, name: str | None = None) -> str:
        name = name or f"vk_test_views_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(HEADER + textwrap.dedent(source).lstrip("\n"))
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield write
    sys.path.remove(str(tmp_path))
    for name in names:
        sys.modules.pop(name, None)


TWO_CARDS = """
@redis_view(table="t1", redis="cache")
def card(item):
    return Value("a:" + item["pk"], 1)

@redis_view(table="t1", redis="cache", name="other")
def other(item):
    return Value("o:" + item["pk"], 1)
"""


def test_the_decorators_record_every_declaration_once_per_import(
    modules: Callable[..., str], tmp_path: Path
) -> None:
    name = modules(TWO_CARDS)
    assert sorted(v.name for v in load_views([name])) == ["card", "other"]
    first = [(d.view.name, d.line) for d in declarations(name)]
    assert first == [("card", 3), ("other", 7)]

    importlib.reload(sys.modules[name])  # the same module again: not counted twice
    assert [(d.view.name, d.line) for d in declarations(name)] == first
    assert len(load_views([name])) == 2

    del sys.modules[name]  # imported anew
    assert len(load_views([name])) == 2
    assert [(d.view.name, d.line) for d in declarations(name)] == first

    # edited (the lines move) and reloaded: only the new declarations count
    (tmp_path / f"{name}.py").write_text(HEADER + "\n\n" + TWO_CARDS.lstrip("\n"))
    importlib.reload(sys.modules[name])
    assert [(d.view.name, d.line) for d in declarations(name)] == [("card", 5), ("other", 9)]
    assert len(load_views([name])) == 2


def test_a_view_defined_twice_under_one_function_name_is_refused(
    modules: Callable[..., str],
) -> None:
    name = modules(
        """
        @redis_view(table="t1", redis="cache")
        def card(item):
            return Value("a:" + item["pk"], 1)

        @redis_view(table="t1", redis="cache")
        def card(item):
            return Value("b:" + item["pk"], 2)
        """
    )
    with pytest.raises(ViewLoadError) as caught:
        load_views([name])
    message = str(caught.value)
    for words in ["'card'", name, "twice", "line 3", "line 7", "rename"]:
        assert words in message, message
    assert "\n" not in message


def test_one_function_declared_twice_under_two_view_names_is_refused(
    modules: Callable[..., str],
) -> None:
    name = modules(
        """
        @redis_view(table="t1", redis="cache", name="card_v1")
        def card(item):
            return Value("a:" + item["pk"], 1)

        @redis_view(table="t1", redis="cache", name="card_v2")
        def card(item):
            return Value("b:" + item["pk"], 2)
        """
    )
    with pytest.raises(
        ViewLoadError, match=r"function 'card' twice, at line 3 .*'card_v1'.*line 7"
    ):
        load_views([name])


def test_a_view_name_reused_after_its_function_was_rebound_is_refused(
    modules: Callable[..., str],
) -> None:
    name = modules(
        """
        @redis_view(table="t1", redis="cache", name="card")
        def card_a(item):
            return Value("a:" + item["pk"], 1)

        card_a = None

        @redis_view(table="t1", redis="cache", name="card")
        def card_b(item):
            return Value("b:" + item["pk"], 2)
        """
    )
    with pytest.raises(
        ViewLoadError, match=r"two views are named 'card': .*card_a \(line 3\).*card_b \(line 9\)"
    ):
        load_views([name])


def test_a_factory_may_declare_several_views_of_one_inner_function(
    modules: Callable[..., str],
) -> None:
    name = modules(
        """
        def make(table):
            @redis_view(table=table, redis="cache", name=f"card_{table}")
            def card(item):
                return Value(table + ":" + item["pk"], 1)
            return card

        card_a = make("a")
        card_b = make("b")
        """
    )
    assert sorted(v.name for v in load_views([name])) == ["card_a", "card_b"]
    importlib.reload(sys.modules[name])
    assert len(declarations(name)) == 2
