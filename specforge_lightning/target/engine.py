"""TargetEngine: the frozen target that turns prompts into features.

Backends: ``HFTargetEngine`` runs a transformers model in-process; an SGLang
backend talks to a server (GPU only, imported lazily). Both return, per
sample, unpadded tensors keyed by feature name:

- ``input_ids`` (L,) int64 and ``loss_mask`` (L,) int64
- ``aux_hidden_states`` (L, k*H): outputs of the chosen decoder layers, concatenated
- ``last_hidden_state`` (L, H): the final post-norm hidden state (lm_head input)
- ``target_top1`` (L,) int64: the target's greedy next token (argmax of its logits) at each
  position that follows a supervised one, -1 elsewhere. These are the EAGLE3 teacher's
  full-vocabulary argmaxes; capturing them here saves every training step that head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from specforge_lightning.contracts import PromptTask
from specforge_lightning.target.hooks import capture_layer_outputs, decoder_layers, decoder_of
from specforge_lightning.target.zoo import load_target


class TargetEngine(Protocol):
    num_layers: int
    hidden_size: int

    def capture(self, tasks: Sequence[PromptTask], layer_ids: Sequence[int]) -> list[dict[str, torch.Tensor]]: ...


class HFTargetEngine:
    """Frozen transformers causal LM; forward hooks collect the chosen layers' outputs."""

    def __init__(self, model: torch.nn.Module, capture_dtype: torch.dtype = torch.bfloat16, pad_id: int = 0):
        self.model = model.eval().requires_grad_(False)
        self.capture_dtype = capture_dtype
        self.pad_id = pad_id
        cfg = model.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        self.device = next(model.parameters()).device

    @classmethod
    def from_path(cls, path: str, dtype: torch.dtype = torch.bfloat16, capture_dtype: torch.dtype | None = None):
        model, tokenizer = load_target(path, dtype=dtype)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(model, capture_dtype=capture_dtype or dtype, pad_id=pad)

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors
    def capture(self, tasks: Sequence[PromptTask], layer_ids: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        if not tasks:
            return []
        bad = [i for i in layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer ids {bad} are outside the target's {self.num_layers} layers")
        lengths = [t.num_tokens for t in tasks]
        seq = max(lengths)
        ids = torch.full((len(tasks), seq), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(tasks), seq), dtype=torch.long)
        for row, task in enumerate(tasks):
            ids[row, : task.num_tokens] = torch.tensor(task.input_ids, dtype=torch.long)
            attn[row, : task.num_tokens] = 1

        with capture_layer_outputs(decoder_layers(self.model), layer_ids) as captured:
            out = decoder_of(self.model)(
                input_ids=ids.to(self.device), attention_mask=attn.to(self.device), use_cache=False
            )
        last = out.last_hidden_state  # after the final norm: what lm_head reads
        aux = torch.cat([captured[i] for i in layer_ids], dim=-1)
        top1 = self._greedy_after_supervised(last, tasks)

        samples = []
        for row, task in enumerate(tasks):
            n = lengths[row]
            samples.append(
                {
                    "input_ids": ids[row, :n].clone(),
                    "loss_mask": torch.tensor(task.loss_mask, dtype=torch.long),
                    "aux_hidden_states": aux[row, :n].to(self.capture_dtype).cpu().clone(),
                    "last_hidden_state": last[row, :n].to(self.capture_dtype).cpu().clone(),
                    "target_top1": top1[row, :n].cpu().clone(),
                }
            )
        return samples

    def _greedy_after_supervised(self, last: torch.Tensor, tasks: Sequence[PromptTask]) -> torch.Tensor:
        """(B, S) argmax of the target's logits where the previous position is supervised, else -1.

        Only those rows run the head (prompts are skipped); the head reads the same
        post-norm states ``last_hidden_state`` holds, before the capture dtype cast.
        """
        top1 = torch.full(last.shape[:2], -1, dtype=torch.long, device=last.device)
        wanted = torch.zeros(last.shape[:2], dtype=torch.bool, device=last.device)
        for row, task in enumerate(tasks):
            mask = torch.tensor(task.loss_mask[:-1], dtype=torch.bool, device=last.device)
            wanted[row, 1 : 1 + mask.numel()] = mask
        if wanted.any():
            head = self.model.get_output_embeddings()
            # In chunks, widened to fp32: the argmax kernel is ~4x slower on bf16 (widening is exact).
            rows = last[wanted]
            top1[wanted] = torch.cat([head(chunk).float().argmax(-1) for chunk in rows.split(1024)])
        return top1
