"""The body's JSON shape, checked against its budget on the bytes, before decoding.

Decoding costs memory by the number of values, not by the bytes: a 1 MiB
`[{}, {}, ...]` becomes about 25 MB of Python objects, and msgspec's own depth limit
(about 1,000 levels) is deeper than the rest of the pipeline re-encodes. So the number
of values and the depth are measured first, in passes that run at C speed over the
bytes: strings are blanked out (their brackets and commas are text) and what is left is
reduced to brackets and commas. The value count is commas + containers + 1 (an upper
bound: a comma separates two values or two members), counted a slice at a time and
only until the budget is exceeded. The depth is the number of rounds
that remove the innermost `[]` pairs; a run of more `[` than the limit allows answers at
once, and the rounds stop one past the limit, so the cost is bounded by the values
budget times the depth budget, whatever the body.

Malformed JSON may measure as anything here; the decoder after this refuses it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_STRUCTURE = b"[]{},"
_OTHER_BYTES = bytes(byte for byte in range(256) if byte not in _STRUCTURE)
_OBJECTS_AS_ARRAYS = bytes.maketrans(b"{}", b"[]")
# Bytes measured per C call (about 6 ms of object-heavy JSON on this machine's cores).
SLICE_BYTES = 256 * 1024


@dataclass(frozen=True)
class BudgetExcess:
    """Which limit the body exceeds: `limit` is the setting's name, `measured` a lower bound."""

    limit: str
    allowed: int
    measured: int

    def __str__(self) -> str:
        what = {"MAX_JSON_DEPTH": "nesting depth", "MAX_JSON_VALUES": "number of JSON values"}[self.limit]
        return f"the body's {what} ({self.measured} or more) exceeds {self.allowed} ({self.limit})"


@dataclass(frozen=True)
class JsonBudget:
    max_depth: int = 64
    max_values: int = 200_000

    def excess(self, body: bytes) -> BudgetExcess | None:
        """The first limit the body exceeds, or None (then it may still be malformed)."""
        pieces, values = [], 1
        for piece in _structure_pieces(body):
            values += piece.count(b",") + piece.count(b"[")
            if values > self.max_values:  # measured no further: over is over
                return BudgetExcess("MAX_JSON_VALUES", self.max_values, values)
            pieces.append(piece)
        brackets = b"".join(pieces).replace(b",", b"")
        too_deep = BudgetExcess("MAX_JSON_DEPTH", self.max_depth, self.max_depth + 1)
        if b"[" * (self.max_depth + 1) in brackets:
            return too_deep
        for _ in range(self.max_depth + 1):
            inner_removed = brackets.replace(b"[]", b"")
            if len(inner_removed) == len(brackets):
                return None  # empty, or unbalanced (not JSON: the decoder says so)
            brackets = inner_removed
        return too_deep if brackets else None


def _structure_pieces(body: bytes, slice_bytes: int = SLICE_BYTES) -> Iterator[bytes]:
    """The body's brackets and commas outside strings, objects as arrays, a slice at a
    time: each pass over a slice is one C call holding the GIL, so a large body checked
    in a worker thread leaves the event loop a turn between slices, and a body over the
    values budget is measured only until it is. A slice that ends inside a string
    carries that string's start into the next one."""
    carry = b""
    for start in range(0, len(body), slice_bytes):
        piece = carry + body[start : start + slice_bytes]
        blanked = _STRING.sub(b"", piece)
        carry = b""
        if b'"' in blanked:  # the slice ends inside a string: measure up to its start
            cut = _last_unescaped_quote(piece)
            piece, carry = piece[:cut], piece[cut:]
            blanked = _STRING.sub(b"", piece)
        yield blanked.translate(_OBJECTS_AS_ARRAYS, _OTHER_BYTES)
    if carry:  # a string never closed: not JSON, the decoder refuses it after this
        yield carry.translate(_OBJECTS_AS_ARRAYS, _OTHER_BYTES)


def _last_unescaped_quote(piece: bytes) -> int:
    """Where the last `"` not escaped by a backslash is (the piece has one)."""
    end = len(piece)
    while True:
        quote = piece.rfind(b'"', 0, end)
        backslashes = quote - len(piece[:quote].rstrip(b"\\"))
        if quote <= 0 or backslashes % 2 == 0:
            return max(quote, 0)
        end = quote
