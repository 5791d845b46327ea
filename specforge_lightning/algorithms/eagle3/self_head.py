"""A current-token head planted in a fresh EAGLE3 draft: a data-dependent initialisation.

Why: the midlayer's residual stream starts as ``fc(aux)``; the embedding of the token the
draft continues from, x_{t+1}, reaches it only through attention. On a CPU budget a fresh
draft's heads settle on attention sinks (the quickstart draft's six unplanted heads put
nearly all their weight on a few fixed prompt positions), so the MLP and ``lm_head`` never
see x_{t+1} and the draft guesses x_{t+2} from the target's belief about x_{t+1} alone.

The planted head attends to its own slot and writes a bigram guess there:
  * query and key are the same whitened code of the slot's embedding half, on every RoPE
    pair: the slot itself (distance 0, nothing rotated) scores highest, and an earlier slot
    holding the same token carries the same value, so matching it instead is harmless;
  * the value projects the embedding on the top ``head_dim`` directions of a ridge
    regression from x_{t+1}'s embedding to the direction of the target's final state at
    t+1 (the state whose head output is the target's prediction of x_{t+2});
  * ``o_proj`` writes that regression's output, ``strength`` times the size of the hidden stream.
Chain steps read their own input token the same way (their own key sits at distance 0), next
to the guess their previous step wrote, which stays in the residual: subtracting "the state
that predicts the input token" there (as the copy head's value does for its copy) lowered
the untrained draft's simulated AL on SmolLM2 (1.196 vs 1.215), so it is left to training.
Only the first query head of the group is planted; the others keep their random queries
and read the same values. Best with ``lm_head`` and ``norm`` initialised from the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specforge_lightning.algorithms.eagle3.copy_head import fit_token_readout, rms, whitened_basis
from specforge_lightning.algorithms.eagle3.model import Eagle3Draft


@torch.no_grad()
def plant_self_head(
    draft: Eagle3Draft,
    input_ids: Sequence[torch.Tensor],
    aux_hidden: Sequence[torch.Tensor],
    last_hidden: Sequence[torch.Tensor],
    loss_mask: Sequence[torch.Tensor],
    *,
    kv_head: int = 1,
    sharpness: float = 2.0,
    strength: float = 8.0,
    ridge: float = 1e-2,
) -> dict[str, float]:
    """Write the current-token head into key/value head ``kv_head`` of ``draft`` (one query head).

    Per training sample: ``input_ids`` (S,), ``aux_hidden`` (S, 3·H_t), the target's final
    post-norm states ``last_hidden`` (S, H_t) and ``loss_mask`` (S,); slot t is fitted where
    the loss supervises it (its teacher is the final state at t+1). ``sharpness`` scales the
    query (softmax temperature), ``strength`` the write relative to ``fc``'s output (large: a
    fresh ``fc`` is noise to ``lm_head``; on SmolLM2 8 beat 2 and 16 after 600 steps).
    Returns what was fitted, including ``bigram_accuracy``: on held-out slots, how often the
    regression's guess and the true final state at t+1 give the same draft-head argmax.
    """
    c = draft.config
    if not 0 <= kv_head < c.num_key_value_heads:
        raise ValueError(f"kv_head {kv_head} outside the draft's {c.num_key_value_heads} key/value heads")
    if c.hidden_size != c.target_hidden_size:
        raise ValueError("the current-token head regresses onto target states: needs draft hidden == target hidden")
    device = draft.d2t.device
    probe_rows = 4096  # supervised slots whose aux states size fc's output
    rows_ids, rows_aux, rows_next = [], [], []
    for ids, aux, last, mask in zip(input_ids, aux_hidden, last_hidden, loss_mask):
        ids, mask = ids.reshape(-1).to(device), mask.reshape(-1).to(device)
        slots = mask[:-1].bool().nonzero().squeeze(-1)  # slot t reads x_{t+1}, its teacher is the state at t+1
        rows_ids.append(ids[slots + 1])
        rows_next.append(last.reshape(len(ids), -1)[slots + 1].float().to(device))
        missing = probe_rows - sum(len(a) for a in rows_aux)
        if missing > 0:  # only the probe's aux rows, not a float copy of every sample's
            rows_aux.append(aux.reshape(len(ids), -1)[slots[:missing]].float().to(device))
    tokens, probe_aux, nxt = torch.cat(rows_ids), torch.cat(rows_aux), torch.cat(rows_next)
    H, hd = c.hidden_size, c.head_dim
    if len(tokens) < 4 * H:
        raise ValueError(f"a current-token head needs at least {4 * H} supervised sample tokens, got {len(tokens)}")
    mid, attn = draft.midlayer, draft.midlayer.self_attn
    emb_in = mid.input_layernorm(draft.embed_tokens.weight.float())  # what q/k/v see of each token
    # Regress the direction of the next final state (the draft's norm re-applies its own weight).
    target = nxt / draft.norm.weight.float()
    held_out = max(1, len(tokens) // 10)
    bigram, check = fit_token_readout(emb_in[tokens], target, ridge, held_out)  # (H, H)
    guess, truth = draft.compute_logits(emb_in[tokens[-held_out:]] @ check), draft.compute_logits(target[-held_out:])
    accuracy = float((guess.argmax(-1) == truth.argmax(-1)).float().mean())

    u, s, vh = torch.linalg.svd(bigram, full_matrices=False)
    r = min(hd, len(s))
    value_dirs, write = u[:, :r].T, s[:r, None] * vh[:r]  # emb -> r dims -> hidden
    probe = tokens[:probe_rows]
    hidden_rms = rms(probe_aux @ draft.fc.weight.float().T)
    scale = strength * hidden_rms / max(rms(emb_in[probe] @ value_dirs.T @ write), 1e-12)

    code = whitened_basis(emb_in[torch.unique(tokens)], hd)  # (<= hd, H)
    g = c.num_attention_heads // c.num_key_value_heads
    q_head = kv_head * g
    wq, wk, wv = (torch.zeros(hd, 2 * H, device=device) for _ in range(3))
    wq[: len(code), :H] = sharpness * code
    wk[: len(code), :H] = code
    wv[:r, :H] = value_dirs
    wo = torch.zeros(H, hd, device=device)
    wo[:, :r] = scale * write.T
    kv_rows = slice(kv_head * hd, (kv_head + 1) * hd)
    planted = (
        (attn.q_proj.weight, slice(q_head * hd, (q_head + 1) * hd), wq),
        (attn.k_proj.weight, kv_rows, wk),
        (attn.v_proj.weight, kv_rows, wv),
    )
    for weight, rows, w in planted:
        weight[rows] = w.to(weight.dtype)
    attn.o_proj.weight[:, q_head * hd : (q_head + 1) * hd] = wo.to(attn.o_proj.weight.dtype)
    return {"tokens": float(len(tokens)), "bigram_accuracy": accuracy, "value_dims": float(r), "write_scale": scale}


__all__ = ["plant_self_head"]
