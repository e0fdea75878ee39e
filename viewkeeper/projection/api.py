"""The view API: ``@redis_view`` and ``@opensearch_view``.

A view is a pure function from one table item (plain Python values, see
:mod:`viewkeeper.stream.records`) to the entries that item should own in one sink. The
decorators do not wrap the function: it stays callable as written, so a view is unit-tested
by calling it. They attach a :class:`View` description that :func:`load_views` collects.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import CodeType
from typing import Any, Literal, NoReturn, TypeVar, overload

from viewkeeper.projection.entries import ttl_problem

__all__ = [
    "Declaration",
    "DocIdFunc",
    "View",
    "ViewFunc",
    "declarations",
    "opensearch_view",
    "redis_view",
    "view_of",
]

ViewFunc = Callable[[dict[str, Any]], Any]
DocIdFunc = Callable[[dict[str, Any]], str]
F = TypeVar("F", bound=Callable[..., Any])

_ATTR = "__viewkeeper_view__"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$")
_INDEX_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,200}$")


@dataclass(frozen=True)
class View:
    """Everything viewkeeper knows about one view."""

    name: str
    table: str
    kind: Literal["redis", "opensearch"]
    connection: str
    func: ViewFunc = field(repr=False, compare=False)
    module: str = ""
    ttl: int | None = None
    index: str | None = None
    doc_id: DocIdFunc | None = field(default=None, repr=False, compare=False)
    options: Mapping[str, Any] = field(default_factory=dict)
    # a change-log view (projection/changelog.py): one entry per change, appended once
    changelog: bool = False

    @property
    def where(self) -> str:
        """Where the view is defined, for error messages: ``views.orders.order_card``."""
        return f"{self.module}.{getattr(self.func, '__qualname__', self.name)}"


def _check_common(
    kind: str, func: object, name: str, table: object, connection: object, conn_word: str
) -> None:
    if not callable(func):
        raise TypeError(f"@{kind} must decorate a function, got {func!r}")
    if not _NAME_RE.match(name):
        raise ValueError(
            f"view name {name!r} is not valid; use letters, digits, '_', '-' or '.' "
            "(at most 100 characters)"
        )
    if not isinstance(table, str) or not table:
        raise ValueError(f"view {name!r}: table must be the source table's name, got {table!r}")
    if not isinstance(connection, str) or not connection:
        raise ValueError(
            f"view {name!r}: {conn_word}= must name a connection declared in the config's "
            f"'{conn_word}:' section, got {connection!r}"
        )


# --- what each module declared ------------------------------------------------------------


@dataclass(frozen=True)
class Declaration:
    """One application of ``@redis_view``/``@opensearch_view``: the view and where it is."""

    view: View
    line: int  # the first line of the decorated function (its first decorator)
    file: str


@dataclass
class _Declared:
    execution: CodeType | None  # the module body that ran the decorators (one per import)
    by_key: dict[tuple[str, int, str], Declaration]


# Every view declared, per module (``View.module``), in declaration order. A module imported
# again (``importlib.reload``, or after leaving ``sys.modules``) runs a new module body: its
# declarations replace those of the earlier run, so nothing is counted twice.
_DECLARED: dict[str, _Declared] = {}


def _module_body(module: str) -> CodeType | None:
    """The code object of ``module``'s body when it is running (the decorators of a module
    run while it is imported), else None (a view declared later, from a function)."""
    try:
        frame = sys._getframe(2)
    except (AttributeError, ValueError):  # not CPython
        return None
    while frame is not None:
        code = frame.f_code
        if code.co_name == "<module>" and frame.f_globals.get("__name__") == module:
            return code
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _record(view: View, func: object) -> None:
    code = getattr(func, "__code__", None)
    line = code.co_firstlineno if isinstance(code, CodeType) else 0
    file = code.co_filename if isinstance(code, CodeType) else ""
    execution = _module_body(view.module)
    declared = _DECLARED.get(view.module)
    if declared is None or (execution is not None and declared.execution is not execution):
        declared = _DECLARED[view.module] = _Declared(execution, {})
    qualname = str(getattr(func, "__qualname__", view.name))
    # the same function declared as the same view again (a factory called twice) replaces
    declared.by_key[(qualname, line, view.name)] = Declaration(view, line, file)


def declarations(module: str) -> list[Declaration]:
    """The views the decorators declared in ``module`` (its latest import), in order,
    including the ones no module attribute holds any more (a second ``def`` of the same
    name replaces the first)."""
    declared = _DECLARED.get(module)
    return [] if declared is None else list(declared.by_key.values())


# --- the decorators ----------------------------------------------------------------------

_MISSING: Any = object()


def _misused(kind: str, func: object, needs: str, **given: object) -> TypeError | None:
    """The error for ``@kind`` without arguments (``func`` is then the decorated function)
    or without a required keyword argument; raised by the decorator itself, so that the
    traceback ends at the user's line."""
    if func is not None:
        name = getattr(func, "__name__", None)
        on = f" on {name}()" if isinstance(name, str) else ""
        return TypeError(
            f"@{kind} is used without its arguments{on}; write @{kind}({needs}) (the "
            "parentheses and the keyword arguments are required)"
        )
    missing = [k + "=" for k, v in given.items() if v is _MISSING]
    if missing:
        return TypeError(f"{kind}() is missing {', '.join(missing)}; write @{kind}({needs})")
    return None


_REDIS_NEEDS = "table=..., redis=..."
_OPENSEARCH_NEEDS = "table=..., opensearch=..., index=..."


@overload
def redis_view(
    *, table: str, redis: str, ttl: int | None = None, name: str | None = None
) -> Callable[[F], F]: ...


@overload
def redis_view(func: Callable[..., Any], /) -> NoReturn: ...


def redis_view(
    func: object = None,
    /,
    *,
    table: str = _MISSING,
    redis: str = _MISSING,
    ttl: int | None = None,
    name: str | None = None,
) -> Callable[[F], F]:
    """Declare a Redis view: the function yields (or returns) Value/HashField/SetMember/
    SortedSetMember entries for one item, and Counter/SortedSetCounter contributions to sums
    shared by many items; nothing or None means the item owns nothing.

    ``ttl`` (seconds) is the default expiry of the view's ``Value`` entries (counters have none).
    """
    misused = _misused("redis_view", func, _REDIS_NEEDS, table=table, redis=redis)
    if misused is not None:
        raise misused

    def decorate(func: F) -> F:
        view_name: str = name or str(getattr(func, "__name__", ""))
        _check_common("redis_view", func, view_name, table, redis, "redis")
        problem = ttl_problem(ttl)
        if problem is not None:
            raise ValueError(f"view {view_name!r}: {problem}")
        view = View(
            name=view_name,
            table=table,
            kind="redis",
            connection=redis,
            func=func,
            module=getattr(func, "__module__", ""),
            ttl=ttl,
        )
        setattr(func, _ATTR, view)
        _record(view, func)
        return func

    return decorate


@overload
def opensearch_view(
    *,
    table: str,
    opensearch: str,
    index: str,
    doc_id: DocIdFunc | None = None,
    name: str | None = None,
) -> Callable[[F], F]: ...


@overload
def opensearch_view(func: Callable[..., Any], /) -> NoReturn: ...


def opensearch_view(
    func: object = None,
    /,
    *,
    table: str = _MISSING,
    opensearch: str = _MISSING,
    index: str = _MISSING,
    doc_id: DocIdFunc | None = None,
    name: str | None = None,
) -> Callable[[F], F]:
    """Declare an OpenSearch view: the function returns one document body (a dict) for the
    item, or None for "no document". ``index`` is the name readers search and get by.
    The document id is the item key (see :func:`viewkeeper.projection.keys.encode_key`)
    unless ``doc_id`` (a function of the item) is given.
    """
    misused = _misused(
        "opensearch_view", func, _OPENSEARCH_NEEDS, table=table, opensearch=opensearch, index=index
    )
    if misused is not None:
        raise misused

    def decorate(func: F) -> F:
        view_name: str = name or str(getattr(func, "__name__", ""))
        _check_common("opensearch_view", func, view_name, table, opensearch, "opensearch")
        if not isinstance(index, str) or not _INDEX_RE.match(index):
            raise ValueError(
                f"view {view_name!r}: index {index!r} is not a valid OpenSearch index name; "
                "use lowercase letters, digits, '_', '-' or '.'"
            )
        if doc_id is not None and not callable(doc_id):
            raise TypeError(f"view {view_name!r}: doc_id must be a function of the item")
        view = View(
            name=view_name,
            table=table,
            kind="opensearch",
            connection=opensearch,
            func=func,
            module=getattr(func, "__module__", ""),
            index=index,
            doc_id=doc_id,
        )
        setattr(func, _ATTR, view)
        _record(view, func)
        return func

    return decorate


def view_of(obj: object) -> View | None:
    """The View a decorated function carries, or None."""
    view = getattr(obj, _ATTR, None)
    return view if isinstance(view, View) else None


def views_in(objects: Iterable[object]) -> list[View]:
    return [v for v in (view_of(o) for o in objects) if v is not None]
