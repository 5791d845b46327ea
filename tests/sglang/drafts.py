"""Tiny drafts of each algorithm on the random 6-layer Llama of ``tests.algorithms.dflash_fixtures``, random weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from specforge_lightning.algorithms.dflash.model import DFlashConfig, DFlashDraft
from specforge_lightning.algorithms.domino.model import DominoConfig, DominoDraft
from specforge_lightning.algorithms.eagle3.model import Eagle3Config, Eagle3Draft
from tests.algorithms.dflash_fixtures import V, make_target

EAGLE3_IDS = (3, 1, 2)  # deliberately not increasing: the export must permute fc to SGLang's capture order
BLOCK_IDS = (4, 1)
VD = 32


def target(root: Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    folder = make_target(root)
    return folder, json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that a wrong name, order or norm shows in the outputs; norms away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def eagle3(cfg: dict, weights: dict[str, torch.Tensor], ids=EAGLE3_IDS) -> Eagle3Draft:
    draft = Eagle3Draft(Eagle3Config.from_target_config(cfg, VD, ids))
    _randomize(draft, 1)
    hot = torch.sort(torch.randperm(V, generator=torch.Generator().manual_seed(2))[:VD]).values
    draft.d2t.copy_(hot - torch.arange(VD))
    draft.t2d.zero_()
    draft.t2d[hot] = True
    draft.embed_tokens.weight = weights["model.embed_tokens.weight"].clone()
    return draft.eval()


def block(cfg: dict, weights: dict[str, torch.Tensor], domino: bool, qk_norm: bool = True, ids=BLOCK_IDS) -> DFlashDraft:
    c = DFlashConfig.from_target_config(cfg, ids, mask_token_id=V - 1, num_hidden_layers=2, block_size=4, qk_norm=qk_norm)
    if domino:
        c = DominoConfig(**dataclasses.asdict(c), emb_dim=16, gru_hidden_dim=24)
    draft = (DominoDraft if domino else DFlashDraft)(c)
    _randomize(draft, 3)
    draft.set_target_weights(weights["model.embed_tokens.weight"], weights["lm_head.weight"])
    return draft.eval()
