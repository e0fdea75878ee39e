"""Reading one mapping of the file: :class:`_Section`'s typed getters (text, flag, integer,
seconds, choice, file, secret) name the key path, the value and the fix in every error, and
:class:`_Ctx` turns a key path into ``file:line``.

Relative paths in the file (``password_file``, ``ssl_ca_file``, ``ca_certs``) are relative to
the config file's folder, not the working directory, so the unit file and a shell agree.
Passwords are read here, at load time, from the environment, a file or a systemd
credential, and held in a :class:`Secret`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from viewkeeper.config.messages import (
    _described,
    _did_you_mean,
    _dotted,
    _kind,
    _Path,
    _show,
    _suggest,
)
from viewkeeper.config.model import ConfigError, Secret

_REQUIRED: Any = object()
_REGION_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_CREDENTIAL_RE = re.compile(r"^[A-Za-z0-9_.@-]+$")
_SECRET_KEYS = ("password_env", "password_file", "password_credential")


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


def _keys(
    cls: type, *, drop: tuple[str, ...] = ("name",), add: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """The keys a section accepts: its dataclass's fields (one list of names to keep)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in drop) + add
