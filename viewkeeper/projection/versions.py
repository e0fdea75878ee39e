"""Versions: ``(generation, sequence)`` and their one text encoding.

A DynamoDB Streams sequence number is a decimal string of 21 to 40 digits. It does not fit a
Java long (OpenSearch external versions) nor a double (Lua numbers), and two of unequal length
must not be compared as text. So a version is carried everywhere as the text ``"G:SEQ"``:
``G`` is the view's generation (a small integer), ``SEQ`` the sequence number without leading
zeros (``"0"`` for rebuild writes). Every comparison — here, in the Redis Lua script and in the
OpenSearch painless script — orders by generation as an integer, then by the length of SEQ,
then by SEQ as text. The short form keeps Redis bookkeeping small (see bench/).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SEQUENCE_WIDTH", "Version", "compare_encoded", "normalize_sequence", "padded_sequence"]


def normalize_sequence(sequence: str | int) -> str:
    """Return a sequence number as digits without leading zeros; reject anything else."""
    text = str(sequence)
    if not text.isdigit() or not text.isascii():
        raise ValueError(
            f"sequence number {sequence!r} is not a decimal string; "
            "DynamoDB Streams sequence numbers are digits only"
        )
    return text.lstrip("0") or "0"


SEQUENCE_WIDTH = 40  # the most digits a DynamoDB Streams sequence number has


def padded_sequence(sequence: str) -> str | None:
    """A sequence number zero-padded to :data:`SEQUENCE_WIDTH` digits, so that text order is
    integer order (the coordination table compares checkpoints this way); None for a
    position that is not a sequence number (``LATEST``, ``TRIM_HORIZON``)."""
    if not sequence.isdigit() or not sequence.isascii():
        return None
    return normalize_sequence(sequence).zfill(SEQUENCE_WIDTH)


@dataclass(frozen=True, slots=True, order=False)
class Version:
    """A view-local version: the generation first, then the stream sequence number."""

    generation: int
    sequence: str

    def __post_init__(self) -> None:
        if self.generation < 0:
            raise ValueError(f"generation {self.generation} is negative; generations start at 0")
        object.__setattr__(self, "sequence", normalize_sequence(self.sequence))

    @classmethod
    def of(cls, generation: int, sequence: str | int) -> Version:
        return cls(generation, str(sequence))

    def encode(self) -> str:
        return f"{self.generation}:{self.sequence}"

    @classmethod
    def decode(cls, text: str) -> Version:
        gen, sep, seq = text.partition(":")
        if not sep or not gen.isdigit():
            raise ValueError(f"version {text!r} is not of the form 'GENERATION:SEQUENCE'")
        return cls(int(gen), seq)

    def _key(self) -> tuple[int, int, str]:
        return (self.generation, len(self.sequence), self.sequence)

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Version) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Version) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Version) -> bool:
        return self._key() >= other._key()

    def __str__(self) -> str:
        return self.encode()


def compare_encoded(a: str, b: str) -> int:
    """Compare two encoded versions: -1, 0 or 1 (the reference for the Lua and painless ports)."""
    ka = Version.decode(a)._key()
    kb = Version.decode(b)._key()
    return (ka > kb) - (ka < kb)
