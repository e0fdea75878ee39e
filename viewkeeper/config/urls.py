"""URLs in the file (Redis URLs, OpenSearch hosts, the AWS endpoint): parsed and checked at
load, and never echoed with a password in them, whatever characters the password holds.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

from viewkeeper.config.messages import _kind, _Path, _show, _show_url
from viewkeeper.config.validation import _Ctx

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


def _split_password(url: str) -> tuple[str, str | None]:
    """The URL without its password, and the password (percent-decoded) or None."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return url, None
    netloc = f"{user}@{hostport}" if user else hostport
    return parts._replace(netloc=netloc).geturl(), unquote(password)
