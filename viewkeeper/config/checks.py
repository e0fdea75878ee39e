"""What runs once the views are imported: every view's connection is declared, and the
config shown for ``viewkeeper check`` with its secrets masked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from viewkeeper.config.model import Config, ConfigError, Secret
from viewkeeper.ops.logs import redact
from viewkeeper.projection.registry import ViewRegistry


def check_view_connections(config: Config, registry: ViewRegistry) -> list[str]:
    """Check that every view's connection is declared; return warnings for what is odd but
    works.

    Raises ConfigError for a view whose ``redis=``/``opensearch=`` names a connection the
    config does not declare. A table a view reads but ``tables:`` does not list is fine: it
    gets the defaults (``starting_position: LATEST``), see :meth:`Config.table`. Warnings:
    a listed table no view reads (it is not tailed), a connection no view uses.
    """
    declared: dict[str, Mapping[str, Any]] = {
        "redis": config.redis,
        "opensearch": config.opensearch,
    }
    views = sorted(registry.views.values(), key=lambda v: v.name)
    for view in views:
        names = declared[view.kind]
        if view.connection not in names:
            listing = ", ".join(sorted(names))
            raise ConfigError(
                f"{config.source}: view {view.name} ({view.where}) uses "
                f"{view.kind}={view.connection!r}, but the config declares {view.kind}: "
                f"[{listing}]; add {view.kind}.{view.connection} or fix the view",
                source=config.source,
                path=f"{view.kind}.{view.connection}",
            )
    warnings: list[str] = []
    used_tables = {v.table for v in views}
    for table in sorted(set(config.tables) - used_tables):
        warnings.append(
            f"{config.source}: tables.{table} is declared but no view reads it; "
            "it will not be tailed"
        )
    for kind, names in declared.items():
        used = {v.connection for v in views if v.kind == kind}
        for name in sorted(set(names) - used):
            warnings.append(f"{config.source}: {kind}.{name} is declared but no view uses it")
    return warnings


def redacted(config: Config) -> dict[str, Any]:
    """The config as plain data for display (``viewkeeper check``): secrets are ``'***'``
    and passwords inside URLs are masked."""
    result = _plain(config)
    assert isinstance(result, dict)
    return result


def _plain(value: Any) -> Any:
    if isinstance(value, Secret):
        return "***"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value
