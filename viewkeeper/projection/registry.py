"""Loading view modules by import name and indexing the views they declare."""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from viewkeeper.projection.api import Declaration, View, declarations, view_of

__all__ = ["ViewLoadError", "ViewRegistry", "load_views"]


class ViewLoadError(Exception):
    """A view module that cannot be imported, or views that contradict each other."""


@dataclass
class ViewRegistry:
    """The loaded views, by name and by source table."""

    views: dict[str, View] = field(default_factory=dict)

    def add(self, view: View) -> None:
        old = self.views.get(view.name)
        if old is not None and old.where != view.where:
            raise ViewLoadError(
                f"two views are named {view.name!r}: {old.where} and {view.where}; "
                "rename one function or pass name= to its decorator"
            )
        self.views[view.name] = view

    def by_table(self, table: str) -> list[View]:
        return [v for v in self.views.values() if v.table == table]

    @property
    def tables(self) -> list[str]:
        return sorted({v.table for v in self.views.values()})

    def connections(self, kind: str) -> set[str]:
        return {v.connection for v in self.views.values() if v.kind == kind}

    def get(self, name: str) -> View:
        try:
            return self.views[name]
        except KeyError:
            known = ", ".join(sorted(self.views)) or "none"
            raise ViewLoadError(f"no view named {name!r}; loaded views: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.views

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.views.values())

    def __len__(self) -> int:
        return len(self.views)


def load_views(modules: Sequence[str], *, search_path: Iterable[str] = ()) -> ViewRegistry:
    """Import each module by name and collect the views it declares.

    ``search_path`` entries are put in front of ``sys.path`` first (the config file's folder,
    so ``views: [views.orders]`` works next to the config).
    """
    for path in search_path:
        if path not in sys.path:
            sys.path.insert(0, path)
    registry = ViewRegistry()
    for name in modules:
        if not isinstance(name, str) or not name:
            raise ViewLoadError(f"views: {name!r} is not a module name like 'views.orders'")
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise ViewLoadError(
                f"views: cannot import {name!r} ({exc}); check the module name and that its "
                "folder is on PYTHONPATH or next to the config file"
            ) from exc
        except Exception as exc:
            tb = traceback.format_exc(limit=-3)
            raise ViewLoadError(f"views: importing {name!r} failed: {exc!r}\n{tb}") from exc
        _check_declared_once(name, declarations(module.__name__))
        found = 0
        for attr in vars(module).values():
            view = view_of(attr)
            if view is not None and view.module == module.__name__:
                registry.add(view)
                found += 1
        if not found:
            raise ViewLoadError(
                f"views: module {name!r} declares no view; decorate a function with "
                "@redis_view or @opensearch_view"
            )
    return registry


def _check_declared_once(module: str, declared: Sequence[Declaration]) -> None:
    """Refuse a module that declares one view name twice, or one function twice: the second
    ``def card`` rebinds the module attribute and the first view would be lost silently."""
    by_name: dict[str, list[Declaration]] = {}
    by_function: dict[str, list[Declaration]] = {}
    for d in declared:
        by_name.setdefault(d.view.name, []).append(d)
        qualname = str(getattr(d.view.func, "__qualname__", d.view.name))
        if "<locals>" not in qualname:  # a factory may make many views of one inner function
            by_function.setdefault(qualname, []).append(d)
    for view_name, same in by_name.items():
        if len(same) < 2:
            continue
        first, second = same[0], same[1]
        if first.view.where == second.view.where:
            raise ViewLoadError(
                f"views: module {module!r} declares the view {view_name!r} twice, at line "
                f"{first.line} and at line {second.line} of {first.file or module}; the second "
                f"definition of {first.view.where} replaces the first, whose view would be lost "
                "silently: rename one of the functions (a view is named after its function "
                "unless name= is given)"
            )
        raise ViewLoadError(
            f"two views are named {view_name!r}: {first.view.where} (line {first.line}) and "
            f"{second.view.where} (line {second.line}); rename one function or pass name= to "
            "its decorator"
        )
    for qualname, same in by_function.items():
        if len(same) < 2:
            continue
        first, second = same[0], same[1]
        raise ViewLoadError(
            f"views: module {module!r} defines the function {qualname!r} twice, at line "
            f"{first.line} (view {first.view.name!r}) and at line {second.line} (view "
            f"{second.view.name!r}) of {first.file or module}; the second definition "
            "replaces the first, whose view would be lost silently: rename one of the functions"
        )
