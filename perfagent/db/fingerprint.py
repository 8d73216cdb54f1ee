"""SQL fingerprints: the statement's shape, with every literal replaced by a placeholder.

``SELECT * FROM post WHERE id = 42`` and ``... id = 43`` and ``... id = ?`` all
become ``SELECT * FROM post WHERE id = ?``; ``IN (1, 2, 3)`` and ``IN (?, ?)``
become ``IN (...)``; comments (sqlcommenter's ``traceparent`` included) go.
The fingerprint is what groups repeated queries, and what is stored or
exported instead of the SQL, so literals (private data) never leave the process.

Normalizing costs tens of µs, so results are cached by statement text: an app
that uses parameters pays once per distinct statement. Statements with
literals inlined (f-strings) differ every time; the cache is bounded.
"""

from __future__ import annotations

import re
import sys
from typing import NamedTuple

_CACHE_MAX = 4096

_COMMENTS = re.compile(r"/\*.*?\*/|--[^\n]*", re.S)
_STRINGS = re.compile(r"'(?:[^']|'')*'|E'(?:[^'\\]|\\.|'')*'", re.S)
_NUMBERS = re.compile(r"(?<![\w$.])[-+]?(?:0x[0-9a-f]+|\d+(?:\.\d+)?(?:e[-+]?\d+)?)(?![\w.])", re.I)
_BOOLEANS = re.compile(r"\b(?:true|false)\b", re.I)
_PARAMS = re.compile(r"\?\d*|\$\d+|:[a-z_]\w*|%\([^)]+\)s|%s", re.I)
_LISTS = re.compile(r"\(\s*\?(?:\s*,\s*\?)*\s*\)")
_VALUES = re.compile(r"(\(\.\.\.\)|\(\?\))(?:\s*,\s*(?:\(\.\.\.\)|\(\?\)))+")
_SPACE = re.compile(r"\s+")
_PUNCTUATION = re.compile(r"\s*([=<>!,(])\s*|\s*(\))")
_MANY = re.compile(r"\(\s*\?\s*,|\bany\s*\(", re.I)
_OPERATION = re.compile(r"^\s*(?:with\b.*?\)\s*)?([a-z]+)", re.I | re.S)
_NOT_REPEATS = ("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "COMMIT", "SET", "SHOW")


class Shape(NamedTuple):
    fingerprint: str
    operation: str
    #: The statement carries a list of several values (IN, ANY, multi-row VALUES):
    #: repeats of it are a batch loader's chunks, not an N+1.
    batched: bool
    #: Transaction control and session settings: never an N+1.
    control: bool


def _normalize(sql: str) -> Shape:
    text = _COMMENTS.sub(" ", sql)
    text = _STRINGS.sub("?", text)
    text = _NUMBERS.sub("?", text)
    text = _BOOLEANS.sub("?", text)
    text = _PARAMS.sub("?", text)
    batched = bool(_MANY.search(text))
    text = _LISTS.sub("(...)", text)
    text = _VALUES.sub(r"\1", text)
    text = _SPACE.sub(" ", text)
    text = _PUNCTUATION.sub(lambda m: m.group(1) or m.group(2), text).strip().rstrip(";").strip()
    match = _OPERATION.match(text)
    operation = match.group(1).upper() if match else ""
    if operation == "WITH":
        operation = "SELECT"
    # One str per operation name, so that the shapes of one operation share it: the
    # compiled histogram step (observe_queries) tells consecutive queries of one
    # (system, operation) entry apart by identity and looks an entry up only when it
    # changes (the 11-query route: one lookup a request instead of two).
    operation = sys.intern(operation)
    return Shape(text, operation, batched, operation in _NOT_REPEATS)


class Fingerprints:
    """Statement text -> Shape, cached."""

    def __init__(self) -> None:
        #: Read directly by the query hooks (a dict lookup, no call) before calling.
        self.cache: dict[str, Shape] = {}

    def __call__(self, sql: str) -> Shape:
        shape = self.cache.get(sql)
        if shape is None:
            shape = _normalize(sql)
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()  # literals inlined by the app: start again, stay bounded
            self.cache[sql] = shape
        return shape
