"""Conversations to token ids plus an assistant-only loss mask, with the tokenizer's own template.

Many chat templates (SmolLM2's among them) have no ``{% generation %}`` tags,
so ``return_assistant_tokens_mask`` cannot be used. Instead each conversation
is rendered prefix by prefix with the template, and the token-space
difference between consecutive prefixes is one turn. For an assistant turn,
the generation prompt (``<|im_start|>assistant\\n``) marks where the header
ends; the content and its end-of-turn token are supervised, and what follows
the end-of-turn token (ChatML's newline) is not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

SUPERVISED_STYLE = "black on green"
UNSUPERVISED_STYLE = "dim"


class ChatTemplateError(ValueError):
    """The template renders a conversation in a way the turn-by-turn mask cannot follow."""


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    max_length: int,
    *,
    train_only_last_turn: bool = False,
) -> tuple[list[int], list[int]]:
    """Return ``(input_ids, loss_mask)``, truncated to ``max_length``.

    Untruncated, ``input_ids`` equals ``apply_chat_template(messages, tokenize=True)``
    token for token. ``loss_mask`` is 1 on assistant content and its end-of-turn
    token (only the last assistant turn's with ``train_only_last_turn``), else 0.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    messages = [dict(m) for m in messages]
    eot = end_of_turn_id(tokenizer)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    supervised_turns = set(assistant_turns[-1:] if train_only_last_turn else assistant_turns)

    ids: list[int] = []
    mask: list[int] = []
    for i in range(len(messages)):
        if len(ids) >= max_length:
            break  # later turns would be truncated away anyway
        rendered = _template_ids(tokenizer, messages[: i + 1])
        if rendered[: len(ids)] != ids:
            at = next((k for k, (a, b) in enumerate(zip(ids, rendered)) if a != b), min(len(ids), len(rendered)))
            raise ChatTemplateError(
                f"chat template is not prefix-stable: adding message {i} ({messages[i]['role']}) changes "
                f"the tokens of the earlier turns at position {at}; the turn-by-turn loss mask needs a template "
                "that renders earlier turns identically whatever follows them"
            )
        turn = rendered[len(ids) :]
        turn_mask = [0] * len(turn)
        if i in supervised_turns:
            start = _header_length(tokenizer, messages, i, ids, rendered)
            tail = turn[start:]
            end = start + (len(tail) - tail[::-1].index(eot) if eot in tail else len(tail))
            turn_mask[start:end] = [1] * (end - start)
        ids, mask = rendered, mask + turn_mask
    return ids[:max_length], mask[:max_length]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes a turn: ChatML's ``<|im_end|>`` when the vocabulary has it, else EOS."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        return im_end
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError("tokenizer has neither <|im_end|> nor an EOS token to end a turn with")
    return int(tokenizer.eos_token_id)


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if isinstance(out, Mapping):  # some versions return a BatchEncoding whatever return_dict says
        out = out["input_ids"]
    return [int(t) for t in out]


def _header_length(
    tokenizer: Any, messages: list[dict[str, str]], i: int, before: list[int], rendered: list[int]
) -> int:
    """Tokens of assistant turn ``i`` that belong to its header, i.e. the template's generation prompt.

    Byte-level BPE can merge the prompt's final newline with leading whitespace
    of the content into one token; that token is counted as content (it is what
    the model must predict), so the prompt may differ from the turn in its last token.
    """
    prompt = _template_ids(tokenizer, messages[:i], add_generation_prompt=True)
    common = 0
    for a, b in zip(prompt, rendered):
        if a != b:
            break
        common += 1
    if common < len(before) or common < len(prompt) - 1:
        raise ChatTemplateError(
            f"the generation prompt for message {i} is not a prefix of the rendered assistant turn "
            f"(they agree on {common} of {len(prompt)} tokens); conversations must start with a user "
            "turn, and the template must render the generation prompt as the start of an assistant turn"
        )
    return min(common, len(rendered)) - len(before)


# --------------------------------------------------------------------------- hashes


def template_hash(tokenizer: Any) -> str:
    """sha256 of the chat template, vocabulary size and special tokens: what the loss mask depends on."""
    payload = {
        "chat_template": tokenizer.chat_template,
        "vocab_size": len(tokenizer),
        "special_tokens": _special_tokens(tokenizer),
    }
    return _sha256_json(payload)


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenization itself (model, merges, normalizers, added tokens), template excluded."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime settings, not the tokenization
        spec.pop("padding", None)
    else:  # a slow tokenizer: its vocabulary is what we can see
        spec = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    return _sha256_json({"tokenizer": spec, "special_tokens": _special_tokens(tokenizer)})


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    named = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in sorted(tokenizer.all_special_tokens)}
    return {"named": named, "ids": ids}


def _sha256_json(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- display


def format_masked_sample(tokenizer: Any, input_ids: Sequence[int], loss_mask: Sequence[int]) -> Text:
    """Decoded text with supervised spans highlighted and the rest dim, then a legend line.

    Runs of equal mask value are decoded together, so multi-byte characters stay whole.
    """
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"{len(input_ids)} input ids but {len(loss_mask)} mask entries")
    text = Text()
    start = 0
    for k in range(1, len(input_ids) + 1):
        if k == len(input_ids) or bool(loss_mask[k]) != bool(loss_mask[start]):
            piece = tokenizer.decode(list(input_ids[start:k]), skip_special_tokens=False)
            text.append(piece, style=SUPERVISED_STYLE if loss_mask[start] else UNSUPERVISED_STYLE)
            start = k
    n_sup = sum(1 for m in loss_mask if m)
    text.append("\n\n")
    text.append(" supervised ", style=SUPERVISED_STYLE)
    text.append(f" {n_sup} tokens   ")
    text.append("not supervised", style=UNSUPERVISED_STYLE)
    text.append(f" {len(loss_mask) - n_sup} tokens   total {len(loss_mask)}")
    return text


def print_masked_sample(
    tokenizer: Any, input_ids: Sequence[int], loss_mask: Sequence[int], console: Console | None = None
) -> None:
    """Print :func:`format_masked_sample` (the ``show-mask`` command)."""
    (console or Console()).print(format_masked_sample(tokenizer, input_ids, loss_mask))
