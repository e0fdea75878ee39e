"""The words of an error message: a key path written as ``worker.batch_size``, a bad value
shown short and with any password masked, its kind (``an integer``), and "did you mean"
suggestions for a near miss.

Everything that quotes a value from the file goes through :func:`_show` or
:func:`_show_url`, so no error ever carries a secret.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable
from typing import Any

from viewkeeper.ops.logs import redact

# A user name shown in front of a masked password (anything else is masked with it).
_PLAIN_USER_RE = re.compile(r"^[A-Za-z0-9._~-]{0,64}$")
_QUERY_SECRET_RE = re.compile(r"(?i)((?:^|[?&;])(?:password|passwd|pwd|secret|token|auth)=)[^&;#]*")


_Path = tuple[str | int, ...]


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
