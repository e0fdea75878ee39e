"""Reading a config file: YAML text → a validated :class:`~viewkeeper.config.model.Config`,
with each key's line number kept for error messages (and a key written twice refused).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from viewkeeper.config.messages import _dotted
from viewkeeper.config.model import Config, ConfigError
from viewkeeper.config.sections import _parse


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
