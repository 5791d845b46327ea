"""DecodeLinear: the same float32 product as nn.Linear at every row count, decoding unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from specforge_lightning.evaluation.decode_linear import MAX_FEW_ROWS, DecodeLinear, use_decode_linears
from specforge_lightning.algorithms.eagle3.drafter import Eagle3Drafter
from specforge_lightning.evaluation.speculative import TargetRunner, greedy_generate, speculative_generate
from tests.evaluation.test_speculative import LAYERS, eval_prompts, tiny_draft, tiny_target


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (1, 1, 24), (6, 24), (1, 6, 24), (MAX_FEW_ROWS + 1, 24), (3, 40, 24)])
def test_decode_linear_matches_linear_at_every_row_count(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    fast = DecodeLinear(linear)
    x = torch.randn(*shape)
    out = fast(x)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)
    assert fast.weight is linear.weight and "weight_t" not in fast.state_dict()  # shared, nothing new saved


def test_swapped_target_decodes_the_same_tokens_and_stays_tied():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    tied = LlamaForCausalLM(cfg).eval()
    fast = copy.deepcopy(tied)
    assert use_decode_linears(fast) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    prompt = [3, 5, 7, 9, 11]
    assert greedy_generate(TargetRunner(fast), prompt, 24, set()) == greedy_generate(TargetRunner(tied), prompt, 24, set())


def test_speculative_decoding_through_decode_linears_matches_plain_greedy():
    target = tiny_target()
    draft = tiny_draft(target, seed=7)
    fast_target, fast_draft = copy.deepcopy(target), copy.deepcopy(draft)
    assert use_decode_linears(fast_target) > 0 and use_decode_linears(fast_draft) > 0
    plain = TargetRunner(target)
    for prompt in eval_prompts():
        ref = greedy_generate(plain, prompt, 20, set())
        slow = speculative_generate(TargetRunner(target, LAYERS), Eagle3Drafter(draft), prompt, 3, 20, set())
        quick = speculative_generate(TargetRunner(fast_target, LAYERS), Eagle3Drafter(fast_draft), prompt, 3, 20, set())
        assert quick.output_ids == slow.output_ids == ref
        assert quick.matched == slow.matched  # the draft proposes the same tokens


def test_only_float32_cpu_linears_are_swapped():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Sequential(nn.Linear(4, 2)))
    assert use_decode_linears(model) == 2
    assert [type(m).__name__ for m in (model[0], model[1], model[2][0])] == ["DecodeLinear", "Linear", "DecodeLinear"]
