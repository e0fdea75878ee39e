"""Loading view modules by import name and indexing the views they declare."""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from viewkeeper.projection.api import View, view_of

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
