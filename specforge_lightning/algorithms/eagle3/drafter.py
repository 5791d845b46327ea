"""Chain and tree drafting with an EAGLE3 draft, for the speculative-decoding harness (``evaluation.speculative``).

Indexing (the draft's training alignment): draft slot ``t`` holds the target's aux hidden
state *of* token ``x_t`` next to the token *after* it, ``x_{t+1}``, at RoPE position ``t``,
and predicts ``x_{t+2}``. With ``n`` tokens known, the draft's cache holds slots
``0..n-2``; the last token ``x_{n-1}`` is the first input of the next verify pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specforge_lightning.algorithms.base import DraftTree, TreeSpec, VerifyingTarget, teacher_forced_aux
from specforge_lightning.algorithms.eagle3.model import Eagle3Cache, Eagle3Draft
from specforge_lightning.algorithms.eagle3.tree import build_tree

CHAIN_DRAFTING = "chain (top-1), verify k+1 tokens per target forward"
CHAIN_SIMULATED_DEFINITION = (
    "1 + sum_k prod_{j<=k} acc_j, acc_j = teacher-forced top-1 accuracy of draft step j along the target's "
    "greedy output on the same prompts (predicted tokens after the first new token only)"
)


class Eagle3Drafter:
    """Chain drafting with an ``Eagle3Draft`` and its KV cache (the harness's ``Drafter``).

    ``start``/``accept`` feed verified slots: the target's aux states (T, 3·H_t)
    of tokens ``x_t`` next to the tokens ``x_{t+1}`` that follow them. ``propose``
    extends the last verified slot ``k - 1`` times on the draft's own hidden
    states, ``propose_tree`` grows an EAGLE-2 tree instead; ``accept`` first drops
    those drafted keys again.
    """

    description = CHAIN_DRAFTING
    simulated_definition = CHAIN_SIMULATED_DEFINITION

    def __init__(self, draft: Eagle3Draft) -> None:
        layer_ids = draft.config.aux_layer_ids
        if len(layer_ids) * draft.config.target_hidden_size != draft.fc.in_features:
            raise ValueError(f"draft config has aux_layer_ids {layer_ids}; its fc expects {draft.fc.in_features} inputs")
        self.draft = draft.eval()
        self.layer_ids = tuple(layer_ids)
        self.device = draft.fc.weight.device
        self.cache = Eagle3Cache()
        self.length = 0  # verified slots in the cache
        self._logits: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None

    def start(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        self.cache, self.length = Eagle3Cache(), 0
        self._feed(aux, next_ids)

    def _feed(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        T = len(next_ids)
        ids = torch.tensor([list(next_ids)], dtype=torch.long, device=self.device)
        pos = torch.arange(self.length, self.length + T, device=self.device)[None]
        logits, hidden, self.cache = self.draft.draft_step(ids, aux[None].to(self.device), pos, self.cache)
        self.length += T
        self._logits, self._hidden = logits[0, -1], hidden[:, -1:]

    def _pick(self, logits: torch.Tensor) -> int:
        return int(self.draft.to_target_ids(logits.argmax(-1)))

    @torch.no_grad()
    def propose(self, k: int) -> list[int]:
        if k <= 0:
            return []
        tokens = [self._pick(self._logits)]
        hidden = self._hidden
        for j in range(k - 1):
            ids = torch.tensor([[tokens[-1]]], dtype=torch.long, device=self.device)
            pos = torch.tensor([[self.length + j]], device=self.device)
            logits, hidden, self.cache = self.draft.draft_step(ids, hidden, pos, self.cache)
            tokens.append(self._pick(logits[0, -1]))
        return tokens

    def propose_tree(self, spec: TreeSpec) -> DraftTree:
        """An EAGLE-2 tree (``eagle3.tree.build_tree``) after the verified text; ``accept`` drops its keys."""
        assert self._logits is not None and self._hidden is not None, "start() first"
        return build_tree(self.draft, self.cache, self.length, self._logits, self._hidden, spec)

    def accept(self, aux: torch.Tensor, next_ids: Sequence[int]) -> None:
        self.cache.truncate(self.length)
        self._feed(aux, next_ids)

    @torch.no_grad()
    def teacher_forced_counts(
        self, runner: VerifyingTarget, prompt_ids: Sequence[int], output_ids: Sequence[int], k: int
    ) -> tuple[list[int], list[int]]:
        """Per-step (correct, total) of the draft along the target's greedy output, as in TTT training.

        Step j at slot t sees the true tokens up to ``x_{t+1+j}`` and predicts ``x_{t+2+j}``;
        only predictions of the new tokens after the first one count (what the harness drafts).
        """
        draft = self.draft
        correct, total = [0] * k, [0] * k
        seq = teacher_forced_aux(runner, prompt_ids, output_ids)
        if seq is None:
            return correct, total
        ids, aux = seq
        P, L = len(prompt_ids), len(ids)
        x = torch.tensor([ids], dtype=torch.long, device=aux.device)
        steps = draft.ttt_forward(x.to(self.device), aux[None].to(self.device), length=k)
        for j, (logits, _) in enumerate(steps):
            t = torch.arange(L, device=x.device)
            target_index = t + 2 + j
            valid = (target_index >= P + 1) & (target_index < L)
            if not valid.any():
                continue
            pred = draft.to_target_ids(logits[0].argmax(-1)).to(x.device)
            truth = x[0, target_index[valid]]
            correct[j] += int((pred[valid] == truth).sum())
            total[j] += int(valid.sum())
        return correct, total


__all__ = ["CHAIN_DRAFTING", "CHAIN_SIMULATED_DEFINITION", "Eagle3Drafter"]
