"""Runs INSIDE .venv-sglang: SGLang's own draft classes load our exported folders and run one forward.

Usage: ``python sglang_side.py CASES.json OUT.safetensors``. Each case names an exported folder,
its algorithm and a safetensors file of fixed inputs (written by tests/sglang/test_conformance.py).
What is SGLang's code here: config parsing (``get_config``), the model classes
(``LlamaForCausalLMEagle3``, ``DFlashDraftModel``), ``load_weights`` with SGLang's weight iterator,
every projection, norm, rotary embedding and MLP, the DFlash context-KV helpers
(``project_target_hidden``, ``kv_proj_only``, ``apply_k_norm``, ``apply_k_rope``) and Domino's
``domino_greedy_rollout``. What is not: the attention KERNEL. SGLang's CPU backends need a KV
pool and a scheduler batch, so ``ReferenceAttention`` below is a plain softmax attention with the
semantics the draft runs under in SGLang (EAGLE3: causal over the extend; DFlash: non-causal over
the context KV plus the block, ``AttentionType.ENCODER_ONLY``). Parallel state: the single-process
fixture SGLang's own CPU unit tests use (``sglang.test.test_utils.publish_build_topology`` plus a
1-rank gloo group).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def init_sglang() -> None:
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.test.test_utils import publish_build_topology

    publish_build_topology(device="cpu")
    fd, path = tempfile.mkstemp(prefix="sglang-dist-")
    os.close(fd)
    os.unlink(path)
    init_distributed_environment(
        backend="gloo", world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{path}"
    )
    initialize_model_parallel(backend="gloo")


class ReferenceAttention:
    """Softmax attention for the layers' RadixAttention calls; ``context`` holds DFlash's per-layer context K/V."""

    def __init__(self, causal: bool) -> None:
        self.causal = causal
        self.context: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        n_q, n_kv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q = q.view(-1, n_q, d)
        k, v = k.view(-1, n_kv, d), v.view(-1, n_kv, layer.v_head_dim)
        if layer.layer_id in self.context:
            ck, cv = self.context[layer.layer_id]
            k, v = torch.cat([ck.view(-1, n_kv, d), k]), torch.cat([cv.view(-1, n_kv, layer.v_head_dim), v])
        g = n_q // n_kv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * layer.scaling
        if self.causal:
            T, S = q.shape[0], k.shape[0]
            mask = torch.arange(S)[None, :] <= (S - T + torch.arange(T))[:, None]
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)
        return out.reshape(q.shape[0], n_q * layer.v_head_dim)


def forward_batch(hidden: torch.Tensor | None = None):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, spec_info=SimpleNamespace(hidden_states=hidden), mm_input_embeds=None,
        contains_mm_inputs=lambda: False, global_num_token_non_padded_cpu=None, mha_return_lse=False,
    )


def build(folder: str, cls_name: str):
    """SGLang's config parsing and model class, then its load_weights on our safetensors."""
    import sglang.srt.layers.radix_attention as radix
    from sglang.srt.model_loader.weight_utils import safetensors_weights_iterator
    from sglang.srt.utils.hf_transformers.config import get_config

    config = get_config(folder, trust_remote_code=False)
    if cls_name == "LlamaForCausalLMEagle3":
        from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3 as cls
    else:
        from sglang.srt.models.dflash import DFlashDraftModel as cls
    assert cls.__name__ in config.architectures, config.architectures
    model = cls(config).eval()
    model.load_weights(safetensors_weights_iterator([os.path.join(folder, "model.safetensors")]))
    return model, config, radix


@torch.no_grad()
def run_eagle3(case: dict, inputs: dict) -> dict:
    model, config, radix = build(case["folder"], "LlamaForCausalLMEagle3")
    backend = ReferenceAttention(causal=True)
    radix.get_attn_backend = lambda: backend
    ids, aux = inputs["input_ids"], inputs["aux_sorted"]
    positions = torch.arange(ids.shape[0])
    emb = inputs["target_embedding"]  # the engine gives the draft the target's embedding (set_embed)
    model.model.embed_tokens.weight[: emb.shape[0]].copy_(emb)  # SGLang pads the vocab rows
    normed, aux_out = model.model(ids, positions, forward_batch(aux))
    logits = F.linear(normed, model.lm_head.weight[: int(config.draft_vocab_size)])
    return {"normed": normed, "prenorm": aux_out[0], "logits": logits, "hot_token_id": model.hot_token_id,
            "fc_in": torch.tensor(model.model.fc.in_features)}


@torch.no_grad()
def run_block(case: dict, inputs: dict) -> dict:
    from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config

    model, config, radix = build(case["folder"], "DFlashDraftModel")
    draft_cfg = parse_dflash_draft_config(draft_hf_config=config)
    backend = ReferenceAttention(causal=False)
    radix.get_attn_backend = lambda: backend
    ids, aux, anchor = inputs["input_ids"], inputs["aux_sorted"], int(inputs["anchor"])
    embedding, head = inputs["target_embedding"], inputs["target_head"]
    ctx = model.project_target_hidden(aux[:anchor])  # context = verified positions before the anchor
    for layer in model.layers:
        attn = layer.self_attn
        k, v = attn.kv_proj_only(ctx)
        k = attn.apply_k_rope(torch.arange(anchor), attn.apply_k_norm(k))
        backend.context[attn.attn.layer_id] = (k, v)
    bs = model.block_size
    block = torch.full((bs,), int(draft_cfg.mask_token_id))
    block[0] = ids[anchor]
    out = model(None, anchor + torch.arange(bs), forward_batch(), input_embeds=F.embedding(block, embedding))
    normed = out.hidden_states
    result = {"normed": normed, "logits": F.linear(normed, head), "block_size": torch.tensor(bs),
              "target_layer_ids": torch.tensor(draft_cfg.resolve_target_layer_ids(
                  target_num_layers=int(draft_cfg.num_target_layers), draft_num_layers=len(model.layers)))}
    if model.projector_type == "domino":
        from sglang.srt.speculative.domino_utils import domino_greedy_rollout

        emb = torch.nn.Embedding.from_pretrained(embedding)
        result["proposals"] = domino_greedy_rollout(
            draft_hidden=normed[None], bonus_tokens=block[:1], target_embedding=emb, lm_head_weight=head,
            prefix_gru=model.prefix_gru, embed_proj=model.embed_proj, vocab_size=int(config.vocab_size),
            shift_label=bool(model.shift_label), candidate_pool_size=0, in_cuda_graph=False,
        )[0]
    return result


def main() -> None:
    cases, out_path = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    init_sglang()
    out, report = {}, {}
    for case in cases:
        inputs = load_file(case["inputs"])
        run = run_eagle3 if case["algorithm"] == "eagle3" else run_block
        try:
            result = run(case, inputs)
        except Exception as e:  # the test prints exactly what fails in SGLang's code
            report[case["name"]] = f"{type(e).__name__}: {e}"
            continue
        report[case["name"]] = "ok"
        out.update({f"{case['name']}.{k}": v.detach().contiguous() for k, v in result.items() if v is not None})
    save_file(out, out_path)
    print("SGLANG_REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
