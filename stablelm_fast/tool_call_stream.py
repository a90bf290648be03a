"""Tool calls found in a reply as it is written (StableLM 2 12B Chat's format: a JSON list of {"name", "arguments"},
or one such object), turned into OpenAI's streamed tool-call deltas.

Text before the call list (and after it) is content. A '[' or '{' is held back only while it may still begin a call
list (`[{"name"`, `{"arguments"`, ...); once the first call's name is complete (and is one of the tools shown) the
call's header goes out (index, id, type, function.name), then its arguments as fragments of the model's own JSON text,
so the fragments concatenate to the arguments' JSON. A small scanner of partial JSON (no dependency) finds where the
names and arguments are in the text so far. The reply only grows, so what the scanner learnt stays true: the end of
every complete value, how far into an open container or string it got (`_Memo`); each delta's rescan from the list's
start steps over those in O(1), and a call's arguments cost time linear in their length, not quadratic (a 12 KB
call in 4-character deltas took 4.8 s of the server's event loop before). `parse_reply` runs the same parser over a
whole reply, so whole and streamed answers agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

CALL_KEYS = ("name", "arguments", "parameters")
MAX_DEPTH = 128  # nesting of the arguments; deeper: not a call
_WS = " \t\r\n"


class _Incomplete(Exception):
    """The text ends inside the JSON value."""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    if i >= len(s):
        raise _Incomplete
    return i


def _past(s: str, j: int, ch: str) -> int:
    """s[j] must be the separator ch (',' or ':'): the index of what follows it, past whitespace."""
    if s[j] != ch:
        raise ValueError(f"expected {ch!r}")
    return _ws(s, j + 1)


_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*', re.S)  # a string's characters and escapes, up to its closing quote


class _Memo:
    """What scanning an append-only text found, by position: the end of each complete value (`done`); for an open
    container, where its next member starts (`resume`); for an open string, how far its body is known (`strings`).
    The text only grows, so none of it changes; without a memo (None) every scan starts afresh."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}
        self.resume: dict[int, int] = {}
        self.strings: dict[int, int] = {}


def _string_end(s: str, i: int, memo: _Memo | None = None) -> int:
    """s[i] == '"': the index after the closing quote."""
    if memo is not None and i in memo.done:
        return memo.done[i]
    start = i + 1 if memo is None else memo.strings.get(i, i + 1)
    j = _STRING_BODY.match(s, start).end()  # stops at the closing quote, the text's end, or a trailing backslash
    if j >= len(s) or s[j] != '"':
        if memo is not None:
            memo.strings[i] = j
        raise _Incomplete
    if memo is not None:
        memo.done[i] = j + 1
        memo.strings.pop(i, None)
    return j + 1


def _value_end(s: str, i: int, depth: int = 0, memo: _Memo | None = None) -> int:
    """The index after the JSON value starting at s[i] (ValueError if it is malformed)."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    c = s[i]
    if c == '"':
        return _string_end(s, i, memo)
    if c in "[{":
        if memo is not None and i in memo.done:
            return memo.done[i]
        close = "]" if c == "[" else "}"
        j = i + 1 if memo is None else memo.resume.get(i, i + 1)
        first = j == i + 1
        while True:
            j = _ws(s, j)
            if s[j] == close:
                if memo is not None:
                    memo.done[i] = j + 1
                    memo.resume.pop(i, None)
                return j + 1
            if not first:
                j = _past(s, j, ",")
            if c == "{":
                if s[j] != '"':
                    raise ValueError("expected a key")
                j = _ws(s, _string_end(s, j, memo))
                j = _past(s, j, ":")
            j = _value_end(s, j, depth + 1, memo)
            first = False
            if memo is not None:
                memo.resume[i] = j  # after a complete member: the next one (or the close) starts here
    j = i
    while j < len(s) and s[j] not in _WS + ",]}":
        j += 1
    if j >= len(s):
        raise _Incomplete  # a number or literal may go on
    json.loads(s[i:j])  # ValueError if it is no JSON scalar
    return j


@dataclass
class _Call:
    name: str | None = None  # once its string is complete
    args: tuple[int, int] | None = None  # [start, end) of the arguments' text so far
    args_done: bool = False
    closed: bool = False


def _scan_call(s: str, j: int, calls: list[_Call], memo: _Memo | None = None) -> int:
    """s[j] == '{': one {"name", "arguments"} object, recorded in calls as far as it goes."""
    call = _Call()
    calls.append(call)
    j, first = j + 1, True
    while True:
        j = _ws(s, j)
        if s[j] == "}":
            if call.name is None:
                raise ValueError("a call without a name")
            call.closed = True
            return j + 1
        if not first:
            j = _past(s, j, ",")
        if s[j] != '"':
            raise ValueError("expected a key")
        key_end = _string_end(s, j, memo)
        key = json.loads(s[j:key_end])
        if key not in CALL_KEYS:
            raise ValueError(f"unexpected key {key!r}")
        j = _ws(s, key_end)
        j = _past(s, j, ":")
        if key == "name":
            if s[j] != '"' or call.name is not None:
                raise ValueError("the name must be one string")
            end = _string_end(s, j, memo)
            call.name = json.loads(s[j:end])
            if not call.name:
                raise ValueError("an empty name")
        else:
            if call.args is not None:
                raise ValueError("arguments given twice")
            call.args = (j, len(s))
            end = _value_end(s, j, 0, memo)
            call.args, call.args_done = (j, end), True
        j, first = end, False


def scan_calls(s: str, i: int, memo: _Memo | None = None) -> tuple[list[_Call], int | None]:
    """s[i] is '[' or '{': the calls written so far and the end of the list (None while it is incomplete).
    ValueError if the text is not (the beginning of) a call list. memo: what earlier scans of this text (shorter then)
    found."""
    calls: list[_Call] = []
    try:
        if s[i] == "{":
            return calls, _scan_call(s, i, calls, memo)
        j, first = i + 1, True
        while True:
            j = _ws(s, j)
            if s[j] == "]" and not first:
                return calls, j + 1
            if not first:
                j = _past(s, j, ",")
            if s[j] != "{":
                raise ValueError("a call is an object")
            j, first = _scan_call(s, j, calls, memo), False
    except _Incomplete:
        return calls, None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def may_start(tail: str) -> bool | None:
    """Whether text beginning with '[' or '{' begins a call list: True, False, or None (cannot tell yet)."""
    t = tail
    if t[0] == "[":
        t = t[1:].lstrip(_WS)
        if not t:
            return None
        if t[0] != "{":
            return False
    t = t[1:].lstrip(_WS)
    if not t:
        return None
    if t[0] != '"':
        return False
    rest, maybe = t[1:], False
    for key in CALL_KEYS:
        if rest.startswith(key + '"'):
            return True
        maybe = maybe or (key + '"').startswith(rest)
    return None if maybe else False


class StreamingToolParser:
    """feed(delta) -> (content to emit, tool-call deltas); finish() at the end of the reply. names: the tools shown
    (a call to another name is content), or None for any name."""

    def __init__(self, names: set[str] | None = None) -> None:
        self.names = names
        self.text = ""
        self.sent = 0  # text[:sent] is settled (content sent, or the call list)
        self.scan_from = 0  # no call list starts before this
        self.start: int | None = None  # where the call list starts, once its first call went out
        self.end: int | None = None  # where it ends, once complete
        self.broken = False  # the list went wrong after calls went out: the rest is content
        self.args_sent: list[int] = []  # per call sent: characters of its arguments sent (-1: sent whole)
        self.calls: list[dict] = []  # the calls sent, assembled (name, arguments so far)
        self.memo = _Memo()  # what the scans of self.text found (it only grows)

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.text += delta
        content = ""
        if self.start is None:
            self._find_start()
            stop = self.scan_from if self.start is None else self.start
            # (leading whitespace waits: it may precede a call)
            if stop > self.sent and (self.sent > 0 or self.text[:stop].strip(_WS)):
                content, self.sent = self.text[self.sent:stop], stop
        deltas = self._call_deltas() if self.start is not None and self.end is None and not self.broken else []
        if self.start is not None and (self.end is not None or self.broken):  # after the list: content again
            content += self.text[max(self.sent, self.end or 0):]
            self.sent = len(self.text)
        return content, deltas

    def finish(self) -> tuple[str, list[dict], bool]:
        """-> (content still to emit, last tool-call deltas, whether a complete call list was sent)."""
        content, deltas = self.feed("")
        if self.start is None:  # a held '[' or '{' that never became a call
            content, self.sent = content + self.text[self.sent:], len(self.text)
        return content, deltas, self.end is not None and bool(self.calls)

    def _find_start(self) -> None:
        text = self.text
        while True:
            brackets = [i for i in (text.find("[", self.scan_from), text.find("{", self.scan_from)) if i >= 0]
            if not brackets:
                self.scan_from = len(text)
                return
            c = min(brackets)
            self.scan_from = c
            verdict = may_start(text[c:])
            if verdict is None:
                return  # hold from c
            if verdict:
                try:
                    calls, _ = scan_calls(text, c, self.memo)
                except ValueError:
                    calls = None
                if calls is not None:
                    if not calls or calls[0].name is None:
                        return  # hold: the first name is not complete yet
                    if self.names is None or calls[0].name in self.names:
                        self.start = c
                        return
            self.scan_from = c + 1

    def _call_deltas(self) -> list[dict]:
        try:
            calls, self.end = scan_calls(self.text, self.start, self.memo)
        except ValueError:
            self.broken, self.sent = True, len(self.text)
            return []
        out: list[dict] = []
        for k, call in enumerate(calls):
            if call.name is None:
                break  # calls go out in order: wait for this name
            if k == len(self.args_sent):
                if self.names is not None and call.name not in self.names:
                    self.broken, self.sent = True, len(self.text)
                    return out
                self.args_sent.append(0)
                self.calls.append({"id": new_call_id(), "type": "function",
                                   "function": {"name": call.name, "arguments": ""}})
                out.append({"index": k, **self.calls[k], "function": {"name": call.name, "arguments": ""}})
            piece = self._args_piece(k, call)
            if piece:
                self.calls[k]["function"]["arguments"] += piece
                out.append({"index": k, "function": {"arguments": piece}})
        return out

    def _args_piece(self, k: int, call: _Call) -> str:
        """The next fragment of call k's arguments: an object or list as the model writes it; anything else whole at
        its end, as OpenAI's JSON-string form (a string as is, null as {}); no arguments at all: {}."""
        if self.args_sent[k] < 0:
            return ""
        if call.args is None:
            if call.closed:
                self.args_sent[k] = -1
                return "{}"
            return ""
        a, b = call.args
        if self.text[a] in "[{":
            piece = self.text[a + self.args_sent[k]: b]
            self.args_sent[k] += len(piece)
            return piece
        if not call.args_done:
            return ""
        self.args_sent[k] = -1
        value = json.loads(self.text[a:b])
        return value if isinstance(value, str) else json.dumps({} if value is None else value, ensure_ascii=False)


def parse_reply(text: str, names: set[str] | None = None) -> tuple[str, list[dict] | None]:
    """A whole reply -> (content, OpenAI tool_calls or None): the calls if the reply holds a complete call list."""
    parser = StreamingToolParser(names)
    content, _ = parser.feed(text)
    rest, _, complete = parser.finish()
    if not complete:
        return text, None
    return content + rest, [{**c, "function": dict(c["function"])} for c in parser.calls]
