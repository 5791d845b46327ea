"""Shared helpers for the DFlash / Domino tests: a tiny random Llama target on disk and some batches."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from specforge_lightning.contracts import FeatureContext, TrainBatch

V, H, LAYERS, LAYER_IDS = 48, 32, 6, (1, 3)


def make_target(root: Path) -> Path:
    """A random 6-layer Llama (untied head) plus a 3-token word-level tokenizer (embedding rows 3.. unused)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=H, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.3,
    )
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="b").save_pretrained(root)
    return root


def context(target_dir: Path) -> FeatureContext:
    return FeatureContext(
        target_dir=str(target_dir), target_id="random-llama", layer_ids=LAYER_IDS, hidden_size=H, vocab_size=V,
        draft_vocab_size=V,
    )


def make_batches(n: int, B: int = 2, S: int = 14, seed: int = 0) -> list[TrainBatch]:
    """Batches with different supervised lengths (so per-batch means differ from the global mean)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, V, (B, S), generator=g)
        lm = torch.zeros(B, S, dtype=torch.long)
        att = torch.ones(B, S, dtype=torch.long)
        for b in range(B):
            start = 2 + (i + b) % 3
            lm[b, start : S - 1 - 3 * ((i + b) % 2)] = 1
        att[-1, S - 2 :] = 0
        lm = lm * att
        aux = torch.randn(B, S, len(LAYER_IDS) * H, generator=g)
        out.append(TrainBatch(
            sample_ids=[f"s{i}-{b}" for b in range(B)], strategy="dflash",
            tensors={"input_ids": ids, "loss_mask": lm, "attention_mask": att, "aux_hidden_states": aux},
        ))
    return out
