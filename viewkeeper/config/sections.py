"""The whole file, section by section: :func:`_parse` checks the top-level keys and builds a
:class:`~viewkeeper.config.model.Config` from one builder per section (the connections are
in :mod:`viewkeeper.config.connections`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from viewkeeper.config.connections import _opensearch, _redis
from viewkeeper.config.messages import _kind, _Path, _show, _show_url
from viewkeeper.config.model import (
    AwsConfig,
    Config,
    CoordinationConfig,
    LoggingConfig,
    MetricsConfig,
    OpenSearchConnection,
    RedisConnection,
    TableConfig,
    TombstoneConfig,
    WorkerConfig,
)
from viewkeeper.config.urls import _AWS_CREDENTIALS_FIX, _check_url
from viewkeeper.config.validation import _REGION_RE, _SECRET_KEYS, _Ctx, _keys, _Section

STREAM_RETENTION_HOURS = 24
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_TABLE_RE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _parse(
    data: Any,
    source: str,
    base_dir: str | None,
    lines: Mapping[_Path, int],
    environ: Mapping[str, str],
) -> Config:
    ctx = _Ctx(source, base_dir, lines, environ)
    if data is None:
        raise ctx.error((), "the config is empty", "start from systemd/viewkeeper.yaml")
    top = _Section(ctx, (), data, _keys(Config, drop=("source", "base_dir")), "aws: ...")
    raw = top.data.get
    aws = _aws(_Section(ctx, ("aws",), raw("aws"), _keys(AwsConfig, drop=()), "{region: ...}"))
    return Config(
        aws=aws,
        views=_views(ctx, raw("views")),
        tables=_named(ctx, "tables", raw("tables"), _table),
        redis=_named(ctx, "redis", raw("redis"), _redis),
        opensearch=_named(ctx, "opensearch", raw("opensearch"), lambda s: _opensearch(s, aws)),
        coordination=_coordination(
            _Section(ctx, ("coordination",), raw("coordination"), _keys(CoordinationConfig))
        ),
        worker=_worker(_Section(ctx, ("worker",), raw("worker"), _keys(WorkerConfig))),
        tombstones=_tombstones(
            _Section(ctx, ("tombstones",), raw("tombstones"), _keys(TombstoneConfig))
        ),
        metrics=_metrics(_Section(ctx, ("metrics",), raw("metrics"), _keys(MetricsConfig))),
        logging=_logging(_Section(ctx, ("logging",), raw("logging"), _keys(LoggingConfig))),
        source=source,
        base_dir=base_dir,
    )


def _aws(s: _Section) -> AwsConfig:
    region = s.text(
        "region", None, example="us-east-1", pattern=_REGION_RE, rule="use an AWS region name"
    )
    if region is None:
        region = s.ctx.environ.get("AWS_REGION") or s.ctx.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise s.ctx.error(
                ("aws", "region"),
                "is missing (and neither AWS_REGION nor AWS_DEFAULT_REGION is set)",
                "add aws: {region: us-east-1}",
            )
    endpoint = None
    if s.has("endpoint_url"):
        path = ("aws", "endpoint_url")
        endpoint = _check_url(
            s.ctx,
            path,
            s.data["endpoint_url"],
            ("http", "https"),
            "endpoint_url: http://127.0.0.1:8000",
            _AWS_CREDENTIALS_FIX,
        )
        if "@" in urlsplit(endpoint).netloc:
            raise s.ctx.error(
                path,
                f"{_show_url(endpoint)} carries credentials",
                "remove them; AWS credentials come from the environment, "
                "aws.profile or an instance role",
            )
    return AwsConfig(
        region=region, endpoint_url=endpoint, profile=s.text("profile", None, example="default")
    )


def _views(ctx: _Ctx, raw: Any) -> tuple[str, ...]:
    path: _Path = ("views",)
    if raw is None:
        raise ctx.error(
            path, "is missing", "add views: [views.orders] (the modules that declare your views)"
        )
    if not isinstance(raw, list):
        example = raw if isinstance(raw, str) else "views.orders"
        raise ctx.error(
            path, f"{_show(raw)} is {_kind(raw)}, not a list", f"write it as views: [{example}]"
        )
    if not raw:
        raise ctx.error(path, "is empty", "name at least one module, like views: [views.orders]")
    out: list[str] = []
    for i, name in enumerate(raw):
        if not isinstance(name, str) or not _MODULE_RE.match(name):
            raise ctx.error(
                (*path, i),
                f"{_show(name)} is not a module name",
                "use a dotted import name like views.orders (no .py, no slashes)",
            )
        if name in out:
            raise ctx.error((*path, i), f"{name!r} is listed twice", "list each module once")
        out.append(name)
    return tuple(out)


_C = TypeVar("_C")
_SECTION_SHAPES: dict[str, tuple[re.Pattern[str], str, tuple[str, ...], str]] = {
    # section: (name rule, what the rule says, known keys, example body)
    "tables": (
        _TABLE_RE,
        "a DynamoDB table name: 3-255 letters, digits, '_', '-' or '.'",
        _keys(TableConfig),
        "{starting_position: LATEST}",
    ),
    "redis": (
        _NAME_RE,
        "a connection name: letters, digits, '_' or '-'",
        _keys(RedisConnection, drop=("name", "password"), add=_SECRET_KEYS),
        '{url: "redis://127.0.0.1:6379/0"}',
    ),
    "opensearch": (
        _NAME_RE,
        "a connection name: letters, digits, '_' or '-'",
        _keys(OpenSearchConnection),
        '{hosts: ["http://127.0.0.1:9200"]}',
    ),
}


def _named(ctx: _Ctx, section: str, raw: Any, build: Callable[[_Section], _C]) -> dict[str, _C]:
    """A mapping of name → body (tables, connections), each body built by ``build``."""
    rule, what, known, example = _SECTION_SHAPES[section]
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ctx.error(
            (section,),
            f"must be a mapping of names, got {_kind(raw)}",
            f"write it as {section}: {{NAME: {example}}}",
        )
    out: dict[str, _C] = {}
    for name, body in raw.items():
        if not isinstance(name, str) or not rule.match(name):
            raise ctx.error((section,), f"{_show(name)} is not valid", f"use {what}")
        out[name] = build(_Section(ctx, (section, name), body, known, example))
    return out


def _table(s: _Section) -> TableConfig:
    position = s.choice("starting_position", "LATEST", ("LATEST", "TRIM_HORIZON"), fold=str.upper)
    return TableConfig(name=str(s.path[-1]), starting_position=position)


def _coordination(s: _Section) -> CoordinationConfig:
    table = s.text(
        "table",
        "viewkeeper-coordination",
        example="viewkeeper-coordination",
        pattern=_TABLE_RE,
        rule="use 3-255 letters, digits, '_', '-' or '.'",
    )
    return CoordinationConfig(table=table, create_if_missing=s.flag("create_if_missing", True))


def _worker(s: _Section) -> WorkerConfig:
    return WorkerConfig(
        poll_interval=s.seconds("poll_interval", 0.25),
        batch_size=s.integer("batch_size", 1000, 1, 1000),
        on_error=s.choice("on_error", "deadletter", ("deadletter", "halt"), fold=str.lower),
        lease_duration=s.seconds("lease_duration", 10.0, positive=True),
        worker_id=s.text(
            "worker_id",
            None,
            example="host-a",
            pattern=re.compile(r"^\S{1,128}$"),
            rule="use up to 128 characters without spaces",
        ),
        renew_threads=s.integer("renew_threads", 8, 1),
        prefetch=s.flag("prefetch", True),
        on_sink_loss=s.choice("on_sink_loss", "report", ("report", "rebuild"), fold=str.lower),
        processes=_processes(s),
    )


MAX_PROCESSES = 256


def _processes(s: _Section) -> int | Literal["auto"]:
    """``worker.processes``: a whole number from 1 to 256, or ``auto``."""
    value = s.data.get("processes")
    if value is None:
        return 1
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_PROCESSES:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        problem = f"{value} is out of range"
    else:
        problem = f"{_show(value)} is {_kind(value)}, not a number of processes"
    raise s.ctx.error(
        (*s.path, "processes"),
        problem,
        f"use a whole number from 1 to {MAX_PROCESSES}, or auto (one per usable core), like "
        "processes: auto",
    )


def _tombstones(s: _Section) -> TombstoneConfig:
    hours = s._get("retention_hours", 48.0, (int, float), "a number of hours", "48")
    if hours < STREAM_RETENTION_HOURS:
        raise s.ctx.error(
            ("tombstones", "retention_hours"),
            f"{hours} is shorter than the {STREAM_RETENTION_HOURS} h stream retention, so a "
            "late stale update could bring a deleted item back",
            f"use at least {STREAM_RETENTION_HOURS} (48 is the default)",
        )
    return TombstoneConfig(retention_hours=float(hours))


def _metrics(s: _Section) -> MetricsConfig:
    disabled = "port" in s.data and s.data["port"] is None
    port = None if disabled else s.integer("port", 9464, 1, 65535)
    host = s.text("host", "127.0.0.1", example="127.0.0.1")
    if not _is_host(host):
        raise s.ctx.error(
            (*s.path, "host"),
            f"{_show(host)} is not an IP address or a host name",
            "use 127.0.0.1 (the default: this machine only), 0.0.0.0 (every address), another "
            "IP address of this machine or a host name, like host: 127.0.0.1",
        )
    return MetricsConfig(port=port, host=host)


def _is_host(text: str) -> bool:
    """An IPv4/IPv6 address (no brackets) or a DNS host name."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOSTNAME_RE.fullmatch(text))
    return True


def _logging(s: _Section) -> LoggingConfig:
    return LoggingConfig(
        format=s.choice("format", "text", ("text", "json"), fold=str.lower),
        level=s.choice("level", "INFO", _LEVELS, fold=str.upper),
    )
