"""The config file: YAML → frozen, validated dataclasses.

Every mistake is a :class:`ConfigError` whose message is one line: the file (and line, when
the YAML tells it), the key path, the bad value, and the fix. Nothing is half-checked at
load and failing later: URLs are parsed, files exist, environment variables are set.

Secrets (passwords) are read at load time from the environment (``password_env``), a file
(``password_file``) or a systemd credential (``password_credential``, from
``LoadCredential=``, found in ``$CREDENTIALS_DIRECTORY``), or taken from a Redis URL, and
held in :class:`Secret`, whose repr and str are ``'***'``: a Config may be printed, logged or
put in an error whole. Each secret is also registered with :mod:`viewkeeper.ops.logs`, which
masks it in any log line that still manages to contain it.

Relative paths in the file (``password_file``, ``ssl_ca_file``, ``ca_certs``) are relative to
the config file's folder, not the working directory, so the unit file and a shell agree.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from viewkeeper.ops.logs import redact, register_secret
from viewkeeper.projection.registry import ViewRegistry

__all__ = [
    "AwsConfig",
    "BasicAuth",
    "Config",
    "ConfigError",
    "CoordinationConfig",
    "LoggingConfig",
    "MetricsConfig",
    "OpenSearchConnection",
    "RedisConnection",
    "Secret",
    "SigV4Auth",
    "TableConfig",
    "TombstoneConfig",
    "WorkerConfig",
    "check_view_connections",
    "load_config",
    "parse_config",
    "redacted",
]

StartingPosition = Literal["LATEST", "TRIM_HORIZON"]
OnError = Literal["deadletter", "halt"]
LogFormat = Literal["text", "json"]
CertReqs = Literal["required", "optional", "none"]
SigV4Service = Literal["es", "aoss"]

STREAM_RETENTION_HOURS = 24
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_TABLE_RE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_REGION_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_INDEX_PREFIX_RE = re.compile(r"^([a-z0-9][a-z0-9_.-]*)?$")
_CREDENTIAL_RE = re.compile(r"^[A-Za-z0-9_.@-]+$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
# A user name shown in front of a masked password (anything else is masked with it).
_PLAIN_USER_RE = re.compile(r"^[A-Za-z0-9._~-]{0,64}$")
_QUERY_SECRET_RE = re.compile(r"(?i)((?:^|[?&;])(?:password|passwd|pwd|secret|token|auth)=)[^&;#]*")
_SECRET_KEYS = ("password_env", "password_file", "password_credential")


class ConfigError(Exception):
    """A config file that cannot be used, explained in one line (never with a secret)."""

    def __init__(self, message: str, *, source: str = "", path: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.path = path


class Secret:
    """A password. Prints as ``***`` everywhere; :meth:`reveal` is the only way to it.

    ``origin`` says where it came from (``env REDIS_PASSWORD``, ``file /etc/…``,
    ``credential redis-password``, ``url``), which is safe to show.
    """

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str = "") -> None:
        self._value = value
        self.origin = origin
        register_secret(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Secret, (self._value, self.origin))


# --- the shape --------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsConfig:
    """Where DynamoDB is. ``region`` falls back to ``$AWS_REGION``/``$AWS_DEFAULT_REGION``."""

    region: str
    endpoint_url: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class TableConfig:
    """A source table. ``starting_position`` is where a shard with no checkpoint starts."""

    name: str
    starting_position: StartingPosition = "LATEST"


@dataclass(frozen=True)
class RedisConnection:
    """One named Redis (``redis: {cache: ...}``).

    ``url`` never holds the password: one written in the URL is moved to ``password``.
    ``owner_buckets`` spreads the owner records of a view over that many hashes.
    """

    name: str
    url: str
    password: Secret | None = None
    key_prefix: str = "vk:"
    owner_buckets: int = 4096
    ssl_ca_file: str | None = None
    ssl_cert_reqs: CertReqs = "required"
    ssl_check_hostname: bool = True
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    socket_timeout: float = 10.0
    connect_timeout: float = 5.0
    health_check_interval: int = 30

    @property
    def tls(self) -> bool:
        return self.url.startswith("rediss://")


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: Secret
    type: Literal["basic"] = "basic"


@dataclass(frozen=True)
class SigV4Auth:
    """AWS request signing; ``service`` is ``es`` (managed domains) or ``aoss`` (Serverless)."""

    region: str
    service: SigV4Service = "es"
    type: Literal["sigv4"] = "sigv4"


@dataclass(frozen=True)
class OpenSearchConnection:
    """One named OpenSearch (``opensearch: {search: ...}``).

    ``index_prefix`` is put in front of every index and alias name viewkeeper manages on this
    connection (one cluster shared by several environments); empty by default, so a view's
    ``index="orders"`` is exactly the name readers use.
    """

    name: str
    hosts: tuple[str, ...]
    auth: BasicAuth | SigV4Auth | None = None
    verify_certs: bool = True
    ca_certs: str | None = None
    index_prefix: str = ""
    timeout: float = 30.0
    max_retries: int = 3
    http_compress: bool = True


@dataclass(frozen=True)
class CoordinationConfig:
    """The DynamoDB table for leases, checkpoints, generations and dead letters."""

    table: str = "viewkeeper-coordination"
    create_if_missing: bool = True


@dataclass(frozen=True)
class WorkerConfig:
    """``on_error``: what a record that cannot be applied does: ``deadletter`` it and go on,
    or ``halt`` the shard (nothing is skipped; an operator decides). ``worker_id`` None means
    one is made up at start (host, pid, random)."""

    poll_interval: float = 0.25
    batch_size: int = 1000
    on_error: OnError = "deadletter"
    lease_duration: float = 10.0
    worker_id: str | None = None


@dataclass(frozen=True)
class TombstoneConfig:
    """How long a deleted item's version is remembered (must outlive the 24 h stream)."""

    retention_hours: float = 48.0

    @property
    def retention_seconds(self) -> float:
        return self.retention_hours * 3600.0


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint; ``port: null`` turns it off."""

    port: int | None = 9464
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class LoggingConfig:
    format: LogFormat = "text"
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    """A loaded config file. ``source`` is its path, ``base_dir`` its folder (where view
    modules are looked up first)."""

    aws: AwsConfig
    views: tuple[str, ...]
    tables: Mapping[str, TableConfig] = field(default_factory=dict)
    redis: Mapping[str, RedisConnection] = field(default_factory=dict)
    opensearch: Mapping[str, OpenSearchConnection] = field(default_factory=dict)
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    tombstones: TombstoneConfig = field(default_factory=TombstoneConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<config>"
    base_dir: str | None = None

    def table(self, name: str) -> TableConfig:
        """The settings of a source table; a table views read but ``tables:`` does not list
        gets the defaults (LATEST)."""
        return self.tables.get(name) or TableConfig(name)

    @property
    def search_path(self) -> tuple[str, ...]:
        """Folders to import view modules from (the config file's own)."""
        return (self.base_dir,) if self.base_dir else ()


# --- loading ----------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read and validate a config file. Raises :class:`ConfigError`."""
    shown = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{shown}: config file not found; pass the right path with -c FILE", source=shown
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"{shown}: cannot read the config file ({reason}); check its permissions and "
            "that it is UTF-8 text",
            source=shown,
        ) from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), shown)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"{where}: not valid YAML ({problem}); check the indentation and quote values "
            "that contain ':' or '#'",
            source=shown,
        ) from None
    base_dir = str(Path(path).resolve().parent)
    return _parse(data, shown, base_dir, lines, os.environ if environ is None else environ)


def parse_config(
    mapping: Any,
    source: str = "<config>",
    *,
    base_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate an already-parsed mapping (tests, embedded configs). Raises ConfigError."""
    return _parse(mapping, source, base_dir, {}, os.environ if environ is None else environ)


def _key_lines(node: yaml.Node | None, source: str) -> dict[tuple[str | int, ...], int]:
    """Line numbers (1-based) of each key, for error messages; best effort (no aliases).

    Also rejects a key written twice in one mapping: YAML would silently keep the last.
    """
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(n: yaml.Node, path: tuple[str | int, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode):
                    sub = (*path, key.value)
                    line = key.start_mark.line + 1
                    if sub in lines:
                        raise ConfigError(
                            f"{source}:{line}: {_dotted(sub)}: is written twice (first on "
                            f"line {lines[sub]}); keep one",
                            source=source,
                            path=_dotted(sub),
                        )
                    lines[sub] = line
                    walk(value, sub)
        elif isinstance(n, yaml.SequenceNode):
            for i, value in enumerate(n.value):
                lines[(*path, i)] = value.start_mark.line + 1
                walk(value, (*path, i))

    if node is not None:
        walk(node, ())
    return lines


# --- validation helpers -----------------------------------------------------------------

_Path = tuple[str | int, ...]
_REQUIRED: Any = object()


def _dotted(path: _Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    """A value for an error message: its repr with URL passwords and secrets masked."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str) and "://" in value:
        return _show_url(value)
    text = redact(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _masked_url(raw: str) -> str:
    """``raw`` with everything between ``://`` (or the start) and the *last* ``@`` masked,
    and ``password=``-like query values masked.

    Works on the raw text, not on urllib's parse: a password holding ``/ # ? "`` or a space
    is split by urllib into host, path, query or fragment, so masking the parsed userinfo
    would show part of it. A plain user name in front of ``:`` stays visible.
    """
    scheme_end = raw.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    at = raw.rfind("@")
    if at >= start:
        user, colon, _ = raw[start:at].partition(":")
        keep = f"{user}:" if colon and _PLAIN_USER_RE.fullmatch(user) else ""
        raw = f"{raw[:start]}{keep}***{raw[at:]}"
    return _QUERY_SECRET_RE.sub(r"\1***", raw)


def _show_url(raw: str) -> str:
    """A URL for an error message (see :func:`_masked_url`), quoted, at most 80 chars."""
    text = redact(repr(_masked_url(raw)))
    return text if len(text) <= 80 else text[:77] + "..."


def _described(value: Any) -> str:
    """``an integer 3``, ``a list``: the kind, and the value when it is short."""
    if isinstance(value, dict | list):
        return _kind(value)
    return f"{_kind(value)} {_show(value)}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


@dataclass
class _Ctx:
    source: str
    base_dir: str | None
    lines: Mapping[_Path, int]
    environ: Mapping[str, str]

    def error(self, path: _Path, problem: str, fix: str) -> ConfigError:
        where = self.source
        for i in range(len(path), 0, -1):
            line = self.lines.get(path[:i])
            if line is not None:
                where = f"{self.source}:{line}"
                break
        dotted = _dotted(path)
        head = f"{where}: {dotted}: " if dotted else f"{where}: "
        return ConfigError(f"{head}{problem}; {fix}", source=self.source, path=dotted)

    def resolve(self, raw: str) -> Path:
        p = Path(raw).expanduser()
        if not p.is_absolute() and self.base_dir:
            p = Path(self.base_dir) / p
        return p


class _Section:
    """One mapping of the file: typed getters that name the key path in every error, and a
    check, up front, that every key is known (so a typo is reported as a typo, not as the
    real key missing)."""

    def __init__(
        self, ctx: _Ctx, path: _Path, data: Any, known: Collection[str], what: str = ""
    ) -> None:
        self.ctx, self.path = ctx, path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            example = what or "key: value"
            raise ctx.error(
                path,
                f"must be a mapping, got {_described(data)}",
                f"write it as {example}",
            )
        for key in data:
            if not isinstance(key, str):
                raise ctx.error(
                    path,
                    f"key {key!r} is not a string",
                    "quote it (YAML reads yes/no/on/off as booleans)",
                )
            if key not in known:
                raise ctx.error((*path, key), "unknown key", _suggest(key, known))
        self.data: dict[str, Any] = data

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _get(
        self, key: str, default: Any, types: tuple[type, ...], expected: str, example: str
    ) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.ctx.error((*self.path, key), "is missing", f"add {key}: {example}")
            return default
        sneaky_bool = isinstance(value, bool) and bool not in types  # bool is an int
        if sneaky_bool or not isinstance(value, types):
            raise self.ctx.error(
                (*self.path, key),
                f"{_show(value)} is {_kind(value)}, not {expected}",
                f"write it like {key}: {example}",
            )
        return value

    def text(
        self,
        key: str,
        default: Any = _REQUIRED,
        example: str = "name",
        pattern: re.Pattern[str] | None = None,
        rule: str = "",
        allow_empty: bool = False,
    ) -> Any:
        value = self._get(key, default, (str,), "a string", example)
        if isinstance(value, str) and not value.strip() and not allow_empty:
            raise self.ctx.error((*self.path, key), "is empty", f"write it like {key}: {example}")
        if isinstance(value, str) and pattern is not None and not pattern.match(value):
            raise self.ctx.error(
                (*self.path, key), f"{_show(value)} is not valid", f"{rule}, like {key}: {example}"
            )
        return value

    def flag(self, key: str, default: bool) -> bool:
        return cast(bool, self._get(key, default, (bool,), "true or false", "true"))

    def integer(self, key: str, default: Any, lo: int, hi: int | None = None) -> Any:
        shown = default if isinstance(default, int) else lo
        value = self._get(key, default, (int,), "an integer", str(shown))
        if isinstance(value, int) and (value < lo or (hi is not None and value > hi)):
            span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise self.ctx.error(
                (*self.path, key), f"{value} is out of range", f"use a whole number {span}"
            )
        return value

    def seconds(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self._get(key, default, (int, float), "a number of seconds", str(default))
        if value < 0 or (positive and value == 0):
            need = "greater than 0" if positive else "0 or more"
            raise self.ctx.error(
                (*self.path, key),
                f"{value} is not a valid duration",
                f"use a number of seconds {need}, like {key}: {default}",
            )
        return float(value)

    def choice(
        self,
        key: str,
        default: str,
        choices: tuple[str, ...],
        *,
        fold: Callable[[str], str] | None = None,
    ) -> Any:
        """One of ``choices`` (returned as Any so it fits the field's Literal type)."""
        value = self._get(key, default, (str,), "a string", str(choices[0]))
        if isinstance(value, str) and fold is not None:
            value = fold(value)
        if value not in choices:
            options = " or ".join(choices)
            raise self.ctx.error(
                (*self.path, key),
                f"{_show(value)} is not allowed",
                f"use {options}" + _did_you_mean(value, choices),
            )
        return value

    def file(self, key: str, what: str) -> str | None:
        raw = self.text(key, None, example="/etc/viewkeeper/file.pem")
        if raw is None:
            return None
        p = self.ctx.resolve(raw)
        if not p.is_file():
            raise self.ctx.error(
                (*self.path, key),
                f"{what} {str(p)!r} does not exist",
                "fix the path (relative paths start at the config file's folder)",
            )
        return str(p)

    def secret(self, secret_keys: tuple[str, ...] = _SECRET_KEYS) -> Secret | None:
        given = [k for k in secret_keys if self.has(k)]
        if len(given) > 1:
            raise self.ctx.error(
                self.path, f"sets {' and '.join(given)}", "keep exactly one source for the password"
            )
        if not given:
            return None
        key = given[0]
        path = (*self.path, key)
        if key == "password_env":
            name = self.text(key, example="REDIS_PASSWORD")
            value = self.ctx.environ.get(name)
            if not value:
                state = "is empty" if value == "" else "is not set"
                raise self.ctx.error(
                    path,
                    f"environment variable {name!r} {state}",
                    f"export {name} in the service environment, or use password_file or "
                    "password_credential",
                )
            return Secret(value, f"env {name}")
        if key == "password_file":
            p = self.ctx.resolve(self.text(key, example="/etc/viewkeeper/redis-password"))
            return Secret(_read_secret(self.ctx, path, p, "password file"), f"file {p}")
        name = self.text(
            key,
            example="redis-password",
            pattern=_CREDENTIAL_RE,
            rule="use the credential's name from LoadCredential=",
        )
        directory = self.ctx.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise self.ctx.error(
                path,
                f"credential {name!r} needs $CREDENTIALS_DIRECTORY, which is not set",
                f"run under systemd with LoadCredential={name}:/path/to/file, or use "
                "password_file outside systemd",
            )
        p = Path(directory) / name
        return Secret(_read_secret(self.ctx, path, p, "credential file"), f"credential {name}")


def _read_secret(ctx: _Ctx, path: _Path, p: Path, what: str) -> str:
    try:
        value = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ctx.error(
            path, f"{what} {str(p)!r} does not exist", "create it (mode 0600) or fix the path"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
        raise ctx.error(
            path,
            f"cannot read {what} {str(p)!r} ({reason})",
            "check that the service user can read it",
        ) from None
    value = value.rstrip("\r\n")
    if not value:
        raise ctx.error(path, f"{what} {str(p)!r} is empty", "write the password into it")
    return value


def _did_you_mean(word: Any, options: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _suggest(key: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    listing = ", ".join(sorted(known))
    if key == "password" or key.endswith("_password"):
        return (
            "passwords are not written in the file; use password_env, password_file or "
            "password_credential"
        )
    if close:
        return f"did you mean {close[0]!r}? (known keys: {listing})"
    return f"remove it (known keys: {listing})"


# --- the sections -----------------------------------------------------------------------


def _keys(
    cls: type, *, drop: tuple[str, ...] = ("name",), add: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """The keys a section accepts: its dataclass's fields (one list of names to keep)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in drop) + add


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


# What to do about a password a URL cannot carry as written, per section.
_PASSWORD_FIX = (
    "percent-encode special characters in the password ('/' as %2F, '#' as %23, '?' as "
    "%3F, '@' as %40, a space as %20) or use password_env"
)
_OPENSEARCH_CREDENTIALS_FIX = (
    "remove the credentials from the URL and use auth: {type: basic, username: ..., "
    "password_env: ...}"
)
_AWS_CREDENTIALS_FIX = (
    "remove the credentials from the URL; AWS credentials come from the environment, "
    "aws.profile or an instance role"
)


def _check_url(
    ctx: _Ctx,
    path: _Path,
    raw: Any,
    schemes: tuple[str, ...],
    example: str,
    credentials_fix: str = _PASSWORD_FIX,
) -> str:
    """A URL with one of ``schemes`` and a host.

    Error messages never show a password, whatever its characters: the URL is shown with
    everything before its last ``@`` masked (:func:`_show_url`), and urllib's own exception
    text (which can quote part of a password, "Port could not be cast to integer value as
    '...'") is never included.
    """
    if not isinstance(raw, str):
        raise ctx.error(path, f"{_show(raw)} is {_kind(raw)}, not a URL", f"use {example}")
    shown = _show_url(raw)
    scheme_end = raw.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    at = raw.rfind("@")
    userinfo = raw[start:at] if at >= start else ""
    split_password = (
        "its user or password part (before the last '@') holds a character a URL does not "
        "allow there ('/', '#', '?' or '@')"
    )
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        if any(c in userinfo for c in "/#?@[]"):
            raise ctx.error(
                path, f"{shown} is not a valid URL: {split_password}", credentials_fix
            ) from None
        raise ctx.error(
            path, f"{shown} is not a valid URL ({_url_trouble(raw, start, at)})", f"use {example}"
        ) from None
    if scheme_end >= 0 and at >= start + len(parts.netloc):
        # the last '@' landed in the path, query or fragment: a password with '/', '#', '?'
        raise ctx.error(path, f"{shown} is not a valid URL: {split_password}", credentials_fix)
    if parts.scheme not in schemes:
        wanted = " or ".join(x + "://" for x in schemes)
        raise ctx.error(path, f"{shown} does not start with {wanted}", f"use {example}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ctx.error(path, f"{shown} has no host", f"use {example}")
    return raw


def _url_trouble(raw: str, start: int, at: int) -> str:
    """Why urllib refused ``raw``, in words that quote nothing before its last ``@``."""
    hostport = re.split(r"[/?#]", raw[max(start, at + 1) :], maxsplit=1)[0]
    if hostport.startswith("[") or hostport.count(":") > 1:
        return "an IPv6 address goes in brackets, like [::1]:6379"
    port = hostport.rpartition(":")[2] if ":" in hostport else ""
    if port.isdigit():
        return f"port {port} is out of range 1-65535"
    if port:
        return "the port is not a number"
    return "it cannot be parsed"


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


_TLS_KEYS = ("ssl_ca_file", "ssl_cert_reqs", "ssl_check_hostname", "ssl_cert_file", "ssl_key_file")


def _redis(s: _Section) -> RedisConnection:
    path = (*s.path, "url")
    raw = _check_url(
        s.ctx,
        path,
        s.text("url", example='"redis://127.0.0.1:6379/0"'),
        ("redis", "rediss", "unix"),
        'url: "redis://127.0.0.1:6379/0"',
    )
    parts = urlsplit(raw)
    db = parts.path.strip("/")
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        raise s.ctx.error(
            path,
            f"{_show_url(raw)} has no socket path",
            "write it like unix:///run/redis/redis.sock?db=0",
        )
    if parts.scheme != "unix" and db and not db.isdigit():
        raise s.ctx.error(
            path,
            f"{_show_url(raw)} names database {db!r}",
            "the path is a database number, like redis://host:6379/0",
        )
    if "password" in parse_qs(parts.query):
        raise s.ctx.error(
            path,
            f"{_show_url(raw)} carries a password in its query",
            "put it in the URL's user part or use password_env, password_file "
            "or password_credential",
        )
    url, url_password = _split_password(raw)
    password = s.secret()
    if url_password is not None:
        if password is not None:
            raise s.ctx.error(
                path,
                "has a password and so does the section",
                "keep one: remove it from the URL or drop password_*",
            )
        password = Secret(url_password, "url")
    tls_keys = [k for k in _TLS_KEYS if s.has(k)]
    if tls_keys and parts.scheme != "rediss":
        raise s.ctx.error(
            (*s.path, tls_keys[0]),
            f"is set but the URL {_show_url(raw)} is not TLS",
            "use a rediss:// URL, or remove the ssl_* keys",
        )
    cert_reqs = s.choice(
        "ssl_cert_reqs", "required", ("required", "optional", "none"), fold=str.lower
    )
    cert_file = s.file("ssl_cert_file", "certificate")
    key_file = s.file("ssl_key_file", "key file")
    if (cert_file is None) != (key_file is None):
        raise s.ctx.error(
            s.path,
            "sets only one of ssl_cert_file and ssl_key_file",
            "a client certificate needs both",
        )
    return RedisConnection(
        name=str(s.path[-1]),
        url=url,
        password=password,
        key_prefix=s.text("key_prefix", "vk:", example='"vk:"', allow_empty=True),
        owner_buckets=s.integer("owner_buckets", 4096, 1, 1 << 20),
        ssl_ca_file=s.file("ssl_ca_file", "CA file"),
        ssl_cert_reqs=cert_reqs,
        ssl_check_hostname=s.flag("ssl_check_hostname", True) and cert_reqs != "none",
        ssl_cert_file=cert_file,
        ssl_key_file=key_file,
        socket_timeout=s.seconds("socket_timeout", 10.0, positive=True),
        connect_timeout=s.seconds("connect_timeout", 5.0, positive=True),
        health_check_interval=s.integer("health_check_interval", 30, 0, 3600),
    )


def _split_password(url: str) -> tuple[str, str | None]:
    """The URL without its password, and the password (percent-decoded) or None."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return url, None
    netloc = f"{user}@{hostport}" if user else hostport
    return parts._replace(netloc=netloc).geturl(), unquote(password)


def _opensearch(s: _Section, aws: AwsConfig) -> OpenSearchConnection:
    example = 'hosts: ["https://search.example.com:9200"]'
    raw = s.data.get("hosts")
    path = (*s.path, "hosts")
    if raw is None:
        raise s.ctx.error(path, "is missing", f"add {example}")
    if isinstance(raw, str):
        raise s.ctx.error(
            path,
            f"{_show_url(raw)} is a string, not a list",
            f"write it as hosts: [{_show_url(raw)}]",
        )
    if not isinstance(raw, list) or not raw:
        raise s.ctx.error(path, f"{_show(raw)} is not a non-empty list", f"use {example}")
    hosts = tuple(
        _check_url(s.ctx, (*path, i), h, ("http", "https"), example, _OPENSEARCH_CREDENTIALS_FIX)
        for i, h in enumerate(raw)
    )
    for i, host in enumerate(hosts):
        if "@" in urlsplit(host).netloc:
            raise s.ctx.error(
                (*path, i),
                f"{_show_url(host)} carries credentials",
                "remove them and use auth: {type: basic, username: ..., password_credential: ...}",
            )
    verify = s.flag("verify_certs", True)
    ca_certs = s.file("ca_certs", "CA bundle")
    if ca_certs and not verify:
        raise s.ctx.error(
            (*s.path, "ca_certs"),
            "is set while verify_certs is false",
            "drop one: a CA bundle is only used to verify certificates",
        )
    return OpenSearchConnection(
        name=str(s.path[-1]),
        hosts=hosts,
        auth=_auth(s, aws),
        verify_certs=verify,
        ca_certs=ca_certs,
        index_prefix=s.text(
            "index_prefix",
            "",
            example="staging-",
            pattern=_INDEX_PREFIX_RE,
            rule="use lowercase letters, digits, '_', '-' or '.'",
            allow_empty=True,
        ),
        timeout=s.seconds("timeout", 30.0, positive=True),
        max_retries=s.integer("max_retries", 3, 0, 20),
        http_compress=s.flag("http_compress", True),
    )


def _auth(s: _Section, aws: AwsConfig) -> BasicAuth | SigV4Auth | None:
    raw = s.data.get("auth")
    path = (*s.path, "auth")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise s.ctx.error(
            path,
            f"must be a mapping, got {_kind(raw)}",
            "write it as auth: {type: basic, username: ..., password_env: ...}",
        )
    kind = raw.get("type")
    if kind == "basic":
        a = _Section(s.ctx, path, raw, _keys(BasicAuth, drop=("password",), add=_SECRET_KEYS))
        username = a.text("username", example="viewkeeper")
        password = a.secret()
        if password is None:
            raise s.ctx.error(
                path,
                "basic auth has no password",
                "add password_env, password_file or password_credential",
            )
        return BasicAuth(username=username, password=password)
    if kind == "sigv4":
        a = _Section(s.ctx, path, raw, _keys(SigV4Auth, drop=()))
        region = a.text(
            "region",
            aws.region,
            example="us-east-1",
            pattern=_REGION_RE,
            rule="use an AWS region name",
        )
        service = a.choice("service", "es", ("es", "aoss"), fold=str.lower)
        return SigV4Auth(region=region, service=service)
    shown = "missing" if kind is None else _show(kind)
    raise s.ctx.error(
        (*path, "type"),
        f"is {shown}",
        "use type: basic (username + password_*) or type: sigv4 (AWS)"
        + _did_you_mean(kind, ("basic", "sigv4")),
    )


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


# --- after the views are loaded ---------------------------------------------------------


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
