"""The EAGLE3 draft: names, config, RoPE parity with transformers, inference API, smart init."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from specforge_lightning.algorithms.layers import rope_cos_sin, rope_inv_freq
from specforge_lightning.algorithms.eagle3.export import REQUIRED_TENSORS
from specforge_lightning.algorithms.eagle3.model import Eagle3Cache, Eagle3Config, Eagle3Draft, shift_left
from tests.algorithms.test_eagle3_loss import make_case, tiny_config

SGLANG_NAMES = set(REQUIRED_TENSORS)  # the names SGLang loads, as the exporter requires them


def test_state_dict_uses_sglang_names_and_shapes():
    c = tiny_config()
    draft = Eagle3Draft(c)
    sd = draft.state_dict()
    assert set(sd) == SGLANG_NAMES  # frozen embedding is not checkpointed
    assert set(draft.export_state_dict()) == SGLANG_NAMES | {"embed_tokens.weight"}
    assert {n for n, p in draft.named_parameters()} == SGLANG_NAMES - {"d2t", "t2d"}
    assert sd["fc.weight"].shape == (c.hidden_size, 3 * c.target_hidden_size)
    assert sd["midlayer.self_attn.q_proj.weight"].shape == (c.num_attention_heads * c.head_dim, 2 * c.hidden_size)
    assert sd["midlayer.self_attn.k_proj.weight"].shape == (c.num_key_value_heads * c.head_dim, 2 * c.hidden_size)
    assert sd["lm_head.weight"].shape == (c.draft_vocab_size, c.hidden_size)
    assert sd["d2t"].dtype == torch.long and sd["t2d"].dtype == torch.bool


def test_config_from_target_both_rope_layouts_and_roundtrip():
    v5 = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
    ).to_dict()
    c = Eagle3Config.from_target_config(v5, draft_vocab_size=40, aux_layer_ids=[0, 1, 2])
    assert (c.head_dim, c.rope_theta, c.rope_scaling, c.aux_layer_ids) == (16, 1e5, None, (0, 1, 2))
    assert (c.vocab_size, c.draft_vocab_size, c.target_hidden_size) == (100, 40, 64)
    legacy = {
        "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "vocab_size": 100,
        "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    }
    c2 = Eagle3Config.from_target_config(legacy, 40, (1, 2, 3))
    assert c2.num_key_value_heads == 4 and c2.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert Eagle3Config.from_dict(c2.to_dict()) == c2
    sg = c2.sglang_config()
    assert sg["architectures"] == ["LlamaForCausalLMEagle3"] and sg["tie_word_embeddings"] is False
    assert sg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 1e5},
        {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
        {
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_matches_transformers(rope):
    hf = LlamaConfig(
        hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=512, rope_parameters=rope
    )
    c = Eagle3Config.from_target_config(hf.to_dict(), 10, (0, 1, 2))
    pos = torch.tensor([[0, 3, 17, 63, 64, 200, 511]])
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = rope_cos_sin(pos, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling), torch.float32)
    torch.testing.assert_close(cos, ref_cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, ref_sin, atol=1e-5, rtol=1e-5)


def test_draft_step_matches_ttt_steps():
    draft, _, batch = make_case(seed=5)
    ids, aux = batch["input_ids"][:1], batch["aux_hidden_states"][:1]  # the unpadded sample
    S = ids.shape[1]
    with torch.no_grad():
        ttt = draft.ttt_forward(ids, aux, length=3)
    pos = torch.arange(S)[None]
    # Step 0 over the whole prefix: token x_{t+1} next to the target's aux at t.
    logits0, hidden0, cache = draft.draft_step(shift_left(ids, 1), aux, pos)
    torch.testing.assert_close(logits0, ttt[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden0, ttt[0][1], atol=1e-5, rtol=1e-5)
    assert cache.length == S

    # Chain from position t: keep the prefix keys up to t, then feed x_{t+2}, x_{t+3}.
    t = 5
    cache.truncate(t + 1)
    assert cache.length == t + 1
    hidden = hidden0[:, t : t + 1]
    for k in (1, 2):
        token = ids[:, t + 1 + k : t + 2 + k]
        logits, hidden, cache = draft.draft_step(token, hidden, torch.tensor([[t + k]]), cache)
        torch.testing.assert_close(logits[:, 0], ttt[k][0][:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden[:, 0], ttt[k][1][:, t], atol=1e-5, rtol=1e-5)
    assert cache.length == t + 3

    # Incremental prefill in two pieces equals one pass.
    l_a, _, c2 = draft.draft_step(shift_left(ids, 1)[:, :4], aux[:, :4], pos[:, :4])
    l_b, _, c2 = draft.draft_step(shift_left(ids, 1)[:, 4:], aux[:, 4:], pos[:, 4:], c2)
    torch.testing.assert_close(torch.cat([l_a, l_b], 1), logits0, atol=1e-5, rtol=1e-5)


def test_to_target_ids_uses_d2t():
    draft = Eagle3Draft(tiny_config(vocab_size=10, draft_vocab_size=4))
    used = torch.tensor([1, 4, 5, 9])
    t2d = torch.zeros(10, dtype=torch.bool)
    t2d[used] = True
    draft.set_vocab_mapping(used - torch.arange(4), t2d)
    assert draft.to_target_ids(torch.tensor([[0, 1, 2, 3]])).tolist() == [[1, 4, 5, 9]]


def test_init_from_target_each_part():
    c = tiny_config()
    H = c.hidden_size
    g = torch.Generator().manual_seed(0)
    target_cfg = {"num_hidden_layers": 3, "tie_word_embeddings": False}
    sd = {"lm_head.weight": torch.randn(c.vocab_size, H, generator=g), "model.norm.weight": torch.rand(H, generator=g)}
    shapes = {
        "self_attn.q_proj.weight": (32, H), "self_attn.k_proj.weight": (16, H), "self_attn.v_proj.weight": (16, H),
        "self_attn.o_proj.weight": (H, 32), "mlp.gate_proj.weight": (48, H), "mlp.up_proj.weight": (48, H),
        "mlp.down_proj.weight": (H, 48), "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
    }
    for i in range(3):
        for n, s in shapes.items():
            sd[f"model.layers.{i}.{n}"] = torch.randn(s, generator=g)
    draft = Eagle3Draft(c)
    used = torch.arange(0, 2 * c.draft_vocab_size, 2)
    t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
    t2d[used] = True
    draft.set_vocab_mapping(used - torch.arange(c.draft_vocab_size), t2d)
    before = {k: v.clone() for k, v in draft.state_dict().items()}

    done = draft.init_from_target(sd, target_cfg, lm_head=True, norm=False, fc=False, midlayer=False)
    assert done == ["lm_head.weight"]
    assert torch.equal(draft.lm_head.weight, sd["lm_head.weight"][used])
    assert torch.equal(draft.norm.weight, before["norm.weight"]) and torch.equal(draft.fc.weight, before["fc.weight"])

    draft.init_from_target(sd, target_cfg, lm_head=False, norm=True, fc=True, midlayer=True, layer=-1)
    assert torch.equal(draft.norm.weight, sd["model.norm.weight"])
    fc = draft.fc.weight
    assert torch.equal(fc[:, 2 * H :], torch.eye(H)) and not fc[:, : 2 * H].any()
    L = "model.layers.2."
    q = draft.midlayer.self_attn.q_proj.weight
    assert torch.equal(q[:, H:], sd[L + "self_attn.q_proj.weight"]) and not q[:, :H].any()
    assert torch.equal(draft.midlayer.mlp.down_proj.weight, sd[L + "mlp.down_proj.weight"])
    assert torch.equal(draft.midlayer.hidden_norm.weight, sd[L + "input_layernorm.weight"])
    assert torch.equal(draft.midlayer.post_attention_layernorm.weight, sd[L + "post_attention_layernorm.weight"])

    # Tied targets take the head from the embedding; emb-half columns can be kept small instead of zero.
    tied = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    tied["model.embed_tokens.weight"] = sd["lm_head.weight"] * 2
    draft2 = Eagle3Draft(c)
    draft2.set_vocab_mapping(draft.d2t, draft.t2d)
    emb_half = draft2.midlayer.self_attn.k_proj.weight[:, :H].clone()
    draft2.init_from_target(tied, {"num_hidden_layers": 3, "tie_word_embeddings": True}, layer=0, emb_half_scale=0.1)
    assert torch.equal(draft2.lm_head.weight, tied["model.embed_tokens.weight"][used])
    torch.testing.assert_close(draft2.midlayer.self_attn.k_proj.weight[:, :H], emb_half * 0.1)


def test_ttt_under_bf16_autocast_runs_close_to_fp32():
    draft, _, batch = make_case(seed=2)
    args = (batch["input_ids"], batch["aux_hidden_states"], batch["attention_mask"], 2)
    with torch.no_grad():
        ref = draft.ttt_forward(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = draft.ttt_forward(*args)
    assert low[1][0].dtype == torch.bfloat16
    real = batch["attention_mask"].bool()
    assert torch.allclose(low[1][0].float()[real], ref[1][0][real], atol=0.15, rtol=0.05)


def test_cache_truncate_on_empty_cache_is_noop():
    cache = Eagle3Cache()
    cache.truncate(3)
    assert cache.length == 0
