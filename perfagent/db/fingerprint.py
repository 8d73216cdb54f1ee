"""SQL fingerprints: the statement's shape, with every literal replaced by a placeholder.

``SELECT * FROM post WHERE id = 42`` and ``... id = 43`` and ``... id = ?`` all
become ``SELECT * FROM post WHERE id=?``; ``IN (1, 2, 3)`` and ``IN (?, ?)``
become ``IN(...)``, the rows of a multi-row ``VALUES`` fold into one; comments
(sqlcommenter's ``traceparent`` included) go. The fingerprint is what groups
repeated queries, and what is stored or exported instead of the SQL, so
literals (private data) never leave the process.

One left-to-right pass over the statement's tokens, in time linear in what it
reads (every token pattern either matches in one go or fails within a few
characters; an unclosed quote or comment runs to the end, it is never rescanned),
and it reads at most the first ``READ_MAX`` characters and ``TOKENS_MAX``
tokens: the rest of a longer statement is summarised by `` …``, and the
parentheses still open at the cut are dropped, so a long batch insert keeps one
fingerprint whatever its length.

What is a literal, per dialect (SQLite, PostgreSQL, MySQL/MariaDB: the caller
says which system the statement went to), privacy first:

- ``'...'`` (doubled ``''`` inside), ``E'...'`` (backslash escapes), ``X'..'``,
  ``B'..'``, ``N'..'``, ``U&'..'``, PostgreSQL's ``$$...$$`` and
  ``$tag$...$tag$``; under MySQL every quoted string takes backslash escapes.
  ``--`` inside a string is text, not a comment. Outside MySQL, a string whose
  closing quote follows an odd run of backslashes (``'C:\\'``) is read as running
  to the end of the statement: MySQL, and PostgreSQL with
  ``standard_conforming_strings`` off, read that quote as escaped.
- Numbers (hex, exponent, a sign where a value starts), ``TRUE``/``FALSE``;
  ``NULL`` is kept. Parameter markers (``?``, ``?1``, ``$1``, ``:name``,
  ``@name``, ``$name``, ``%s``, ``%(name)s``) become ``?`` too.
- ``"..."`` is where the dialects disagree: an identifier for PostgreSQL and the
  standard, a string for MySQL (unless ANSI_QUOTES), and for SQLite an
  identifier unless no such column exists, then a string (``WHERE name =
  "alice"`` runs). The rule here: under MySQL always a literal; elsewhere a
  literal where a value is expected (after a comparison or arithmetic operator,
  ``LIKE``, ``IS [NOT]``, ``BETWEEN … AND``, ``THEN``/``ELSE``, ``CASE x WHEN``,
  ``LIMIT``/``OFFSET``, ``DEFAULT``, inside ``VALUES (…)`` rows, ``IN (…)``,
  ``ANY (…)`` and the arguments of a function called there), or when it does not
  look like a name (a space inside, more than 64 characters); a name everywhere
  else (select lists, ``FROM``, ``SET "col" =``, column lists, the left of a
  comparison, ``AS``, and ``"t"."c"`` qualified names wherever they stand). So
  ``"alice"`` compared to a column never survives, and the quoted names that ORMs
  write (Django quotes every one) do. The price: a quoted column alone on the
  right of a comparison (``a.x = "y"``) reads as ``?``, and SQLite's string
  misfeature in a select list (``SELECT "alice"``) keeps the word.
- Backticks are names (kept). ``#`` starts a comment (MySQL's; PostgreSQL's XOR
  ``a # b`` loses the rest of its line, its ``#>`` and ``#>>`` stay operators).
  Block comments nest (PostgreSQL's rule; under SQLite a ``/*`` inside a comment is
  text, and reading it as nesting only ever drops more).

Normalizing costs tens of µs, so results are cached by statement text: an app
that uses parameters pays once per distinct statement. Statements with literals
inlined (f-strings) differ every time, so the cache is bounded by bytes (the
statements' text and their shapes, estimated): when full it starts again, and the
shapes it forgets are counted. A statement longer than ``READ_MAX`` is never kept
as a key: its shape is cached by its length and hash (a 64-bit hash and the
length: two such statements would have to collide on both to share a shape).
"""

from __future__ import annotations

import re
import sys
from typing import Any, NamedTuple

#: Characters of a statement read; the rest is summarised by `` …``.
READ_MAX = 8192
#: Tokens read, at most: 8 KB of ordinary SQL has ~2,000 (one per 4 characters);
#: one token a character (``((((…``, ``1,1,1,…``) is cut at half of it.
TOKENS_MAX = 4096
#: The default bound of the fingerprint cache (``PERFAGENT_FINGERPRINT_CACHE_BYTES``).
CACHE_BYTES = 4 * 1024 * 1024
#: What a cache entry costs besides the two strings: the Shape tuple, its booleans
#: shared, a dict slot.
_ENTRY_BYTES = 72 + 48
_CUT = " …"

_INTROSPECTION = re.compile(
    r"\b(?:sqlite_(?:temp_)?(?:master|schema)\b|information_schema\.|pg_catalog\.)", re.I
)
_NOT_REPEATS = frozenset(("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "COMMIT", "SET", "SHOW"))


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: The statement a ``WITH`` clause leads to.
_MAIN = _words("SELECT INSERT UPDATE DELETE MERGE REPLACE VALUES TABLE")
#: Words after which a value stands (a double-quoted token there is a literal).
_VALUE_WORDS = _words(
    "LIKE ILIKE GLOB REGEXP RLIKE MATCH SIMILAR IS BETWEEN THEN ELSE LIMIT OFFSET DEFAULT "
    "ESCAPE IN VALUES ANY ALL SOME RETURN"
)
#: Words after which a sign belongs to the number that follows (``SELECT -1``).
_SIGN_WORDS = _VALUE_WORDS | _words("SELECT WHERE AND OR NOT ON SET BY HAVING CASE AS WHEN")
#: Operators after which a value stands.
_VALUE_OPS = _words("= == <> != < > <= >= <=> + - * / % || & | ^ << >> ~ -> ->> %%")
#: Spaces around these go (``id = ?`` is ``id=?``), and before ``)``.
_TIGHT = frozenset("=<>!,(")
_TIGHT_BEFORE = frozenset("=<>!,()")

# The token kinds: the groups of the token pattern, in the order they are tried (the
# frequent first: every alternative tried costs a full attempt).
(
    _WORD,
    _COMMA,
    _LIST,
    _OPEN,
    _CLOSE,
    _BLOCK,
    _LINE,
    _LITERAL,
    _DOLLAR,
    _PARAM,
    _DQUOTE,
    _BACKTICK,
    _OP,
) = range(1, 14)
_COMMENT_MARK = re.compile(r"/\*|\*/")
#: A double-quoted token that may be kept as a name: no space, at most 64 characters.
_NAME = re.compile(r'(?:[uU]&)?"[^\s"]{1,64}"').fullmatch


def _tokens(mysql: bool) -> Any:
    """The ``match`` of a dialect's token pattern: white space, then one token (no
    group for the end of the text). Each alternative matches or fails within a few
    characters (an identifier's length at most); every quoted form runs to the end
    of the text when it is not closed, so nothing is ever rescanned."""
    if mysql:
        single = r"(?:[xXbBnN]|_[a-zA-Z0-9]+)?'[^'\\]*(?:(?:''|\\[\s\S])[^'\\]*)*'?"
        strings = single + r'|"[^"\\]*(?:(?:""|\\[\s\S])[^"\\]*)*"?'
        double = dollar = r"(?!)"
        line = r"--[^\n]*|\#[^\n]*"
        prefixed = r"[xXbBnN]'|_[a-zA-Z0-9]+'"
    else:
        strings = (
            r"[eE]'[^'\\]*(?:(?:''|\\[\s\S])[^'\\]*)*'?"
            r"|(?:[xXbBnN]|[uU]&)?'[^']*(?:''[^']*)*'?"
        )
        double = r'(?:[uU]&)?"[^"]*(?:""[^"]*)*"?'
        dollar = r"\$(?:[^\W\d]\w*)?\$"
        # ``#`` is MySQL's comment, PostgreSQL's XOR (and ``#>``, ``#>>``, ``#-`` its JSON
        # operators): read as a comment but before ``>`` and ``-``, dropping, never leaking.
        line = r"--[^\n]*|\#(?![>-])[^\n]*"
        prefixed = r"[eExXbBnN]'|[uU]&['\"]"
    number = r"(?:\d|\.\d)(?:[\w.]|(?<=[eE])[-+](?=\d))*"
    param = (
        r"\?\d*|\$\d+|\$[^\W\d]\w*|:[^\W\d]\w*|:\d+|@(?!@)[^\W\d][\w$]*"
        r"|%\([^)\s%(]{0,100}\)[sbt]|%[sbt](?!\w)"
    )
    word = rf"(?!{prefixed})[^\W\d][\w$]*|@@[\w.$]+"
    backtick = r"`[^`]*(?:``[^`]*)*`?"
    operator = r"::|<=>|<>|!=|<=|>=|==|\|\||<<|>>|->>|->|#>>|#>|%%|[\s\S]"
    # A list of nothing but placeholders, plain numbers and plain strings, in one match:
    # ``(?, ?, ?)``, ``(1, 2, 3)``; what it reads is what the tokens one by one would
    # fold into ``(...)``, and where it fails (a comment, a name, ``''``) they take over.
    item = rf"(?:{param}|[-+]?(?:\d|\.\d)[\w.]*|'[^'\\]*'(?!'))"
    listed = rf"\(\s*{item}(?:\s*,\s*{item})*\s*\)"
    alternatives = [
        word,
        ",",
        listed,
        r"\(",
        r"\)",
        r"/\*",
        line,
        strings + "|" + number,
        dollar,
        param,
        double,
        backtick,
        operator,
    ]
    pattern = r"\s*(?:" + "|".join(f"({a})" for a in alternatives) + "|$)"
    return re.compile(pattern).match


_STANDARD = _tokens(mysql=False)
_MYSQL = _tokens(mysql=True)


class Shape(NamedTuple):
    fingerprint: str
    operation: str
    #: The statement carries a list of several values (IN, ANY, multi-row VALUES):
    #: repeats of it are a batch loader's chunks, not an N+1.
    batched: bool
    #: Transaction control, session settings and schema introspection: never an N+1.
    #: fastlite reads ``sqlite_master`` and ``PRAGMA table_info`` again before each
    #: insert or update, an ORM reflects tables: none of it is the app's own N+1 or a
    #: query the app could run once. Such queries still count (time, queries per
    #: request); they are never reported.
    control: bool


def _block_end(text: str, pos: int, mysql: bool) -> int:
    """Where the block comment opened just before ``pos`` ends (the text's end when
    it does not): nested ones counted, but under MySQL."""
    if mysql:
        end = text.find("*/", pos)
        return len(text) if end < 0 else end + 2
    depth = 1
    for mark in _COMMENT_MARK.finditer(text, pos):
        depth += 1 if mark.group() == "/*" else -1
        if not depth:
            return mark.end()
    return len(text)


def _escaped(token: str) -> bool:
    """Whether a quoted token ends with an odd run of backslashes before its closing
    quote: MySQL (and PostgreSQL with standard_conforming_strings off) read that
    quote as escaped and the string as going on, so the rest is read as a literal."""
    if "\\" not in token:
        return False
    body = token[:-1]
    return (len(body) - len(body.rstrip("\\"))) % 2 == 1


def _normalize(sql: str, mysql: bool = False) -> Shape:
    """The shape of ``sql``: one pass over the tokens of its first ``READ_MAX``
    characters (``TOKENS_MAX`` tokens at most). ``out`` holds the fingerprint's
    tokens, each with the space kept before it; ``groups`` the open parentheses (their
    index in ``out``, whether values stand in them: ``VALUES (…)``, ``IN (…)``, a call
    where a value stands; whether it is a row of VALUES)."""
    cut = len(sql) > READ_MAX
    text = sql[:READ_MAX] if cut else sql
    match = _MYSQL if mysql else _STANDARD
    out: list[str] = []
    append = out.append
    groups: list[tuple[int, bool, bool]] = []
    pos = 0
    space = False  # white space or a comment before the next token
    value = False  # a value stands next: a double-quoted token there is a literal
    callee = False  # the last token is a word where a value stands (``= lower(``)
    signed = True  # a sign next starts a number (``= -1``), not a subtraction
    sign = False  # the last token is such a sign
    before_sign = -1  # ``plain`` before it
    between = False  # BETWEEN seen, its AND not yet
    case_at = -1  # index in ``out`` of a CASE whose first WHEN is not yet seen
    when_value = True  # values follow WHEN (the last CASE has an operand)
    closed_row = False  # the last token closes a row of VALUES
    row = False  # the next ``(`` opens one: ``VALUES (…), (``
    plain = -1  # index in ``out`` of the last token that is neither ``?`` nor ``,``
    batched = False
    operation = ""
    main = False  # the operation is WITH's: the statement it leads to is looked for
    for _ in range(TOKENS_MAX):
        m = match(text, pos)
        kind = m.lastindex
        if kind is None:
            break
        end = m.end()
        token = m.group(kind)
        if end - len(token) != pos:
            space = True
        pos = end
        if kind == _WORD:
            upper = token.upper()
            if upper == "TRUE" or upper == "FALSE":
                value = signed = callee = sign = False
                token = "?"
            else:
                if not operation:
                    operation, main = upper, upper == "WITH"
                elif main and upper in _MAIN and not groups:
                    operation, main = upper, False
                callee = value
                if upper == "AND":
                    value, between = between, False
                elif upper == "WHEN":
                    # ``CASE x WHEN "v"``: a value; ``CASE WHEN "c" = …``: a condition.
                    if case_at >= 0:
                        when_value, case_at = case_at != len(out) - 1, -1
                    value = when_value
                elif upper != "NOT":  # ``IS NOT "x"``, ``NOT LIKE``: as before NOT
                    value = upper in _VALUE_WORDS
                    between = between or upper == "BETWEEN"
                    if upper == "CASE":
                        case_at = len(out)
                signed = upper in _SIGN_WORDS
                sign = False
                plain = len(out)
        elif kind == _COMMA:
            if out and out[-1] == "?" and len(out) > 1 and out[-2] == "(":
                batched = True
            row, closed_row = closed_row, False
            value = row or (bool(groups) and groups[-1][1])
            signed, callee, sign, space = True, False, False, False
            append(",")
            continue
        elif kind in (_LITERAL, _PARAM):
            if sign and not space and token[0] in "0123456789.":
                space = out.pop()[0] == " "  # the sign is the number's
                plain = before_sign
            elif "\\" in token and not mysql and token[0] not in "eE" and _escaped(token):
                pos = len(text)
            value = signed = callee = sign = False
            token = "?"
        elif kind == _OP:  # 13: everything else
            if signed and (token == "-" or token == "+"):
                signed, sign, value = False, True, True
                before_sign = plain
            else:
                value = signed = token in _VALUE_OPS
                sign = False
            callee = False
            plain = len(out)
        elif kind == _LIST:  # ``(?, ?)``: what OPEN, the items and CLOSE would do
            batched = batched or "," in token
            is_row = row
            if value and out:
                last = out[-1].lstrip().upper()
                batched = batched or last == "ANY"
                is_row = row or last == "VALUES"
            if len(out) > 1 and out[-1] == "," and out[-2] == "(...)":
                out.pop()  # the rows of a multi-row VALUES, folded
            else:
                append("(...)")
            plain = len(out) - 1
            closed_row = is_row
            value = signed = callee = sign = space = row = False
            continue
        elif kind == _OPEN:
            opened = value or callee
            is_row = row
            if value and out:
                last = out[-1].lstrip().upper()
                batched = batched or last == "ANY"
                is_row = row or last == "VALUES"
            groups.append((len(out), opened, is_row))
            row = closed_row = False
            plain = len(out)
            append("(")
            value, signed, callee, sign, space = opened, True, False, False, False
            continue
        elif kind == _CLOSE:
            value = signed = callee = sign = space = False
            row = closed_row = False
            if groups:
                start, _, closed_row = groups.pop()
                if plain == start and out[-1] == "?":
                    del out[start + 1 :]
                    out[start] = "(...)"
                    if start > 1 and out[start - 1] == "," and out[start - 2] == "(...)":
                        del out[start - 1 :]  # the rows of a multi-row VALUES, folded
                    plain = len(out) - 1
                    continue
            plain = len(out)
            append(")")
            continue
        elif kind == _DQUOTE:
            if _escaped(token):
                token, pos = "?", len(text)
            elif (value and text[pos : pos + 1] != ".") or not _NAME(token):
                token = "?"
            else:
                plain = len(out)
            value = signed = callee = sign = False
        elif kind == _DOLLAR:
            close = text.find(token, pos)
            pos = len(text) if close < 0 else close + len(token)
            value = signed = callee = sign = False
            token = "?"
        elif kind == _BLOCK:
            pos = _block_end(text, pos, mysql)
            space = True
            continue
        elif kind == _LINE:
            space = True
            continue
        else:  # _BACKTICK
            value = signed = callee = sign = False
            plain = len(out)
        if space:
            if out and out[-1][-1] not in _TIGHT and token[0] not in _TIGHT_BEFORE:
                token = " " + token
            space = False
        append(token)
        row = closed_row = False
    else:
        cut = cut or match(text, pos).lastindex is not None
    while out and out[-1].strip() == ";":
        out.pop()
    if cut:
        if groups:
            del out[groups[0][0] :]  # a statement cut inside parentheses: up to them
        while out and out[-1] == ",":
            out.pop()
        append(_CUT)
    if main or operation == "WITH":
        operation = "SELECT"
    # One str per operation name, so that the shapes of one operation share it: the
    # compiled histogram step (observe_queries) tells consecutive queries of one
    # (system, operation) entry apart by identity and looks an entry up only when it
    # changes (the 11-query route: one lookup a request instead of two).
    operation = sys.intern(operation)
    fingerprint = "".join(out).lstrip()
    control = (
        operation in _NOT_REPEATS
        or operation == "PRAGMA"
        or _INTROSPECTION.search(fingerprint) is not None
    )
    return Shape(fingerprint, operation, batched, control)


class Fingerprints:
    """Statement text -> Shape, cached within ``max_bytes``."""

    def __init__(self, max_bytes: int = CACHE_BYTES, dropped: Any = None) -> None:
        #: Read directly by the query hooks (a dict lookup, no call) before calling.
        #: Only statements of at most ``READ_MAX`` characters are keys.
        self.cache: dict[str, Shape] = {}
        #: (length, hash) of a longer statement -> its Shape.
        self._long: dict[tuple[int, int], Shape] = {}
        self._bytes = 0
        self._max_bytes = max_bytes
        #: A counter (``inc(n)``) of the shapes forgotten when the cache starts again.
        self._dropped = dropped

    def __call__(self, sql: str, system: str = "") -> Shape:
        """The shape of ``sql``, a statement sent to ``system`` (``mysql`` reads
        MySQL's quotes and comments)."""
        size = len(sql)
        if size > READ_MAX:
            key = (size, hash(sql))
            shape = self._long.get(key)
            if shape is None:
                shape = _normalize(sql, system == "mysql")
                self._keep(self._long, key, shape, 120)
            return shape
        shape = self.cache.get(sql)
        if shape is None:
            shape = _normalize(sql, system == "mysql")
            self._keep(self.cache, sql, shape, sys.getsizeof(sql))
        return shape

    def _keep(self, cache: dict, key: Any, shape: Shape, key_bytes: int) -> None:
        cost = key_bytes + sys.getsizeof(shape.fingerprint) + _ENTRY_BYTES
        if self._bytes + cost > self._max_bytes:
            # Literals inlined by the app, or simply many statements: start again, stay
            # bounded (the cache is the hooks' own dict: cleared, never replaced).
            forgotten = len(self.cache) + len(self._long)
            self.cache.clear()
            self._long.clear()
            self._bytes = 0
            if self._dropped is not None and forgotten:
                self._dropped.inc(forgotten)
        cache[key] = shape
        self._bytes += cost
