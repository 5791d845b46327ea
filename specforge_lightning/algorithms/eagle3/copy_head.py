"""A copy (induction) head planted in a fresh EAGLE3 draft: a data-dependent initialisation.

Why: small chat targets repeat themselves. On SmolLM2's own greedy answers, "copy
what followed the last occurrence of this token" predicts the target's next token
about as often as a trained draft does, and whole loops at a time. A one-layer draft
can express that rule (an induction head) but does not discover it on a CPU budget,
so it is written into one key/value head before training; training then sharpens,
keeps or unlearns it like any other weight.

Draft slot s pairs the target's hidden states at position s (whose low captured
layer still knows the token x_s) with the embedding of x_{s+1}. The planted head
  * queries with the embedding half: "which slots hold my token x_{t+1}?",
  * keys each slot by x_s, read from the captured states: a ridge regression from
    the aux states to the token's embedding, fitted on a few training samples and
    written into a spare random subspace of ``fc``,
  * values each slot with its embedding half, i.e. x_{s+1}, the token to copy, minus
    the slot's own token x_s (from the planted subspace): a chain step's input hidden
    still holds the copy its previous step wrote, and this removes it,
and ``o_proj`` writes that token's code where ``norm`` + ``lm_head`` will read it
(so initialise ``lm_head`` and ``norm`` from the target first). Queries and keys use
only RoPE pairs that barely turn over ``max_position`` tokens: the match is by
content, wherever the earlier occurrence is. Nothing else in the draft changes.

With ``previous > 0`` the match also scores the token before: the query adds x_t (its
slot's own token, from the planted subspace), the key adds x_{s-1} (a second readout
from the aux states, which know the previous token less well, in a second subspace),
on the next-slowest RoPE pairs. A token that occurs twice in a loop with different
continuations ("a runtime error and a logical error") is then told apart by the
token before it, as a two-token (bigram) lookup would. Chain steps (k >= 1) still read
step 0's x_t as "the token before" (nothing moves the planted code along the chain), so
there the previous-token term is noise and the current token decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from specforge_lightning.algorithms.layers import rope_inv_freq
from specforge_lightning.algorithms.eagle3.model import Eagle3Draft


def content_pairs(head_dim: int, inv_freq: torch.Tensor, max_position: int) -> list[int]:
    """RoPE pair indices that turn by at most 0.5 rad over ``max_position`` (at least ``head_dim // 8``)."""
    order = torch.argsort(inv_freq).tolist()  # slowest first
    slow = [i for i in order if float(inv_freq[i]) * max_position <= 0.5]
    return sorted(slow if len(slow) >= max(1, head_dim // 8) else order[: max(1, head_dim // 8)])


def next_slowest_pairs(inv_freq: torch.Tensor, taken: Sequence[int], count: int, near: int = 32) -> list[int]:
    """Up to ``count`` of the slowest RoPE pairs not in ``taken`` that turn by at most 90 degrees
    over ``near`` tokens. They turn with distance, which only favours recent matches: a loop's
    previous occurrence is near (SmolLM2's answers: median 15 tokens back)."""
    taken = set(taken)
    order = [i for i in torch.argsort(inv_freq).tolist() if i not in taken]
    return sorted(i for i in order[:count] if float(inv_freq[i]) * near <= math.pi / 2)


def _pair_dims(pairs: Sequence[int], head_dim: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(pairs) + [p + head_dim // 2 for p in pairs], device=device)


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def fit_token_readout(
    aux: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3, held_out: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regressions ``aux @ W ~ target``: on all rows, and without the last ``held_out`` rows.

    The penalty is relative to each column's scale: captured layers differ ~25x in scale
    (SmolLM2: rms 3 at layer 1, 75 at layer 26) and the quiet low layer knows the token.
    Both fits share one Gram matrix (the expensive part).
    """
    scale = aux.pow(2).mean(0).sqrt().clamp_min(1e-6)
    z = aux / scale
    n = len(z) - held_out
    eye = ridge * n * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    gram, rhs = z[:n].T @ z[:n], z[:n].T @ target[:n]
    partial = torch.linalg.solve(gram + eye, rhs) / scale[:, None]
    gram, rhs = gram + z[n:].T @ z[n:], rhs + z[n:].T @ target[n:]
    full = torch.linalg.solve(gram + eye * len(z) / n, rhs) / scale[:, None]
    return full, partial


def _fit_key(
    aux: torch.Tensor, token_ids: torch.Tensor, emb_in: torch.Tensor, seen: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, float]:
    """A readout aux -> the token's embedding, and how often its held-out guess is the nearest seen token."""
    held_out = max(1, len(token_ids) // 10)
    readout, check = fit_token_readout(aux, emb_in[token_ids], ridge, held_out)
    guess = F.normalize(aux[-held_out:] @ check, dim=-1) @ F.normalize(emb_in[seen], dim=-1).T
    return readout, float((seen[guess.argmax(-1)] == token_ids[-held_out:]).float().mean())


def _gain(true_code: torch.Tensor, read: torch.Tensor) -> float:
    """Least-squares scale from the true code to what is read back after ``hidden_norm``."""
    return float((read * true_code).sum() / true_code.pow(2).sum().clamp_min(1e-12))


def whitened_basis(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The top-``n`` principal directions of ``rows``, each scaled to unit variance: (n, H)."""
    centred = rows - rows.mean(0)
    var, vecs = torch.linalg.eigh(centred.T @ centred / len(rows))  # ascending
    var, vecs = var.flip(0), vecs.flip(1)
    n = min(n, int((var > var[0] * 1e-8).sum()))
    return (vecs[:, :n] / var[:n].sqrt()).T


@torch.no_grad()
def plant_copy_head(
    draft: Eagle3Draft,
    input_ids: Sequence[torch.Tensor],
    aux_hidden: Sequence[torch.Tensor],
    *,
    kv_head: int = 0,
    max_position: int = 512,
    sharpness: float = 3.0,
    strength: float = 2.0,
    unwrite: float = 1.0,
    previous: float = 0.0,
    ridge: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Write a copy head into key/value head ``kv_head`` of ``draft`` (and its query heads).

    ``input_ids[i]`` (S,) and ``aux_hidden[i]`` (S, 3·H_t) are training samples' tokens and
    captured aux states. ``sharpness`` scales the queries (softmax temperature);
    ``strength`` is the size of the copied token's vector relative to the hidden stream;
    ``unwrite`` (0..1) how much of the slot's own token the value subtracts (see below);
    ``previous`` the weight of the previous-token match relative to the current one (0: off).
    Returns what was fitted, including ``key_token_accuracy``: how often the keys
    recover the slot's token on held-out positions of the samples (nearest embedding),
    and with ``previous`` the same for the previous token (``previous_token_accuracy``).
    """
    c = draft.config
    if not 0 <= kv_head < c.num_key_value_heads:
        raise ValueError(f"kv_head {kv_head} outside the draft's {c.num_key_value_heads} key/value heads")
    ids = torch.cat([t.reshape(-1) for t in input_ids]).to(draft.d2t.device)
    aux = torch.cat([a.reshape(len(t.reshape(-1)), -1) for t, a in zip(input_ids, aux_hidden)]).float()
    aux = aux.to(ids.device)
    if aux.shape[1] != 3 * c.target_hidden_size:
        raise ValueError(f"aux states have width {aux.shape[1]}, the draft reads {3 * c.target_hidden_size}")
    if len(ids) < 4 * aux.shape[1] // 3:
        raise ValueError(f"a copy head needs at least {4 * aux.shape[1] // 3} sample tokens, got {len(ids)}")
    H, hd = c.hidden_size, c.head_dim
    g = c.num_attention_heads // c.num_key_value_heads
    mid, attn = draft.midlayer, draft.midlayer.self_attn
    emb_in = mid.input_layernorm(draft.embed_tokens.weight.float())  # what q/k/v see of each token

    # Keys: which token sits at the slot (and, with ``previous``, the one before), read from the aux states.
    seen = torch.unique(ids)
    readout, key_accuracy = _fit_key(aux, ids, emb_in, seen, ridge)  # (3·H_t, H)

    inv_freq = rope_inv_freq(hd, c.rope_theta, c.rope_scaling)
    pairs = content_pairs(hd, inv_freq, max_position)
    prev_pairs = next_slowest_pairs(inv_freq, pairs, len(pairs)) if previous > 0 else []
    basis = whitened_basis(emb_in[seen], max(hd, 2 * len(pairs)))  # token codes, decorrelated
    dims = _pair_dims(pairs, hd, ids.device)[: len(basis)]
    prev_dims = _pair_dims(prev_pairs, hd, ids.device)[: len(basis)]
    match_code, value_code, prev_code = basis[: len(dims)], basis[:hd], basis[: len(prev_dims)]

    # fc: the slot's token code (all n value dims) alone in a random n-dim subspace of the hidden
    # stream, each dim as large as a dim of the rest of it. Its first dims are the match code.
    # The previous token's code (m dims) gets a second subspace the same way.
    n, m = len(value_code), len(prev_code)
    gen = torch.Generator().manual_seed(seed)
    subspace, _ = torch.linalg.qr(torch.randn(H, n + m, generator=gen, dtype=torch.float32))
    subspace = subspace.to(ids.device)
    own_sub, prev_sub = subspace[:, :n], subspace[:, n:]
    probe, probe_ids = aux[:4096], ids[:4096]
    fc = draft.fc.weight.float()
    hidden_rms = rms(probe @ fc.T)
    fc_scale = hidden_rms / max(rms(probe @ readout @ value_code.T), 1e-12)
    fc = fc - subspace @ (subspace.T @ fc) + fc_scale * own_sub @ value_code @ readout.T
    if m:
        starts = torch.tensor([0] + [t.numel() for t in input_ids[:-1]], device=ids.device).cumsum(0)
        has_prev = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        has_prev[starts] = False  # a sample's first slot has no token before it
        prev_aux, prev_ids = aux[has_prev], ids.roll(1)[has_prev]
        prev_probe, prev_probe_ids = prev_aux[:4096], prev_ids[:4096]
        prev_readout, prev_accuracy = _fit_key(prev_aux, prev_ids, emb_in, seen, ridge)
        prev_scale = hidden_rms / max(rms(prev_probe @ prev_readout @ prev_code.T), 1e-12)
        fc = fc + prev_scale * prev_sub @ prev_code @ prev_readout.T
    draft.fc.weight.copy_(fc.to(draft.fc.weight.dtype))
    # hidden_norm rescales every slot: fit the gain from the true code to what q/k/v read there.
    true_code = emb_in[probe_ids] @ value_code.T
    gain = _gain(true_code, mid.hidden_norm(probe @ draft.fc.weight.float().T) @ own_sub)

    q_rows = slice(kv_head * g * hd, (kv_head + 1) * g * hd)
    kv_rows = slice(kv_head * hd, (kv_head + 1) * hd)
    wq = torch.zeros(g, hd, 2 * H, device=ids.device)
    wq[:, dims, :H] = sharpness * match_code
    wk = torch.zeros(hd, 2 * H, device=ids.device)
    wk[dims, H:] = own_sub[:, : len(dims)].T / gain
    if m:  # query: the slot's own token x_t; key: the token before the slot's, x_{s-1}
        prev_read = mid.hidden_norm(prev_probe @ draft.fc.weight.float().T) @ prev_sub
        prev_gain = _gain(emb_in[prev_probe_ids] @ prev_code.T, prev_read)
        wq[:, prev_dims, H:] = previous * sharpness * own_sub[:, :m].T / gain
        wk[prev_dims, H:] = prev_sub.T / prev_gain
    # The value is the next token's code; with ``unwrite`` it also subtracts the slot's own token's
    # code, so a chain step removes the copy its previous step wrote (that token is now its input).
    wv = torch.zeros(hd, 2 * H, device=ids.device)
    wv[:n, :H] = value_code
    wv[:n, H:] = -unwrite * own_sub.T / gain
    planted = ((attn.q_proj, q_rows, wq.reshape(g * hd, 2 * H)), (attn.k_proj, kv_rows, wk), (attn.v_proj, kv_rows, wv))
    for proj, rows, w in planted:
        proj.weight[rows] = w.to(proj.weight.dtype)

    # o_proj: write the code so that lm_head(norm(.)) scores the copied token highest (least squares).
    head = draft.lm_head.weight.float() * draft.norm.weight.float()
    vocab_codes = emb_in[draft.to_target_ids(torch.arange(c.draft_vocab_size, device=ids.device))] @ value_code.T
    writer = torch.linalg.lstsq(head, vocab_codes).solution  # (H, n): head_j @ writer ~ code_j
    copy_scale = strength * hidden_rms / max(rms(true_code @ writer.T), 1e-12) / g
    for h in range(kv_head * g, (kv_head + 1) * g):
        cols = slice(h * hd, h * hd + n)
        attn.o_proj.weight[:, cols] = (copy_scale * writer).to(attn.o_proj.weight.dtype)
    report = {
        "tokens": float(len(ids)),
        "content_dims": float(len(dims)),
        "key_token_accuracy": key_accuracy,
        "fc_scale": fc_scale,
        "copy_scale": copy_scale,
    }
    if m:
        report.update(previous_dims=float(m), previous_token_accuracy=prev_accuracy)
    return report


__all__ = ["content_pairs", "fit_token_readout", "next_slowest_pairs", "plant_copy_head", "rms", "whitened_basis"]
