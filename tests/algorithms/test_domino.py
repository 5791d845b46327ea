"""Domino: λ schedule, the mixed loss and its gradient against a naive per-block loop, checkpoints, registry."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from specforge_lightning.algorithms.domino import DominoConfig, DominoModule, lambda_base
from specforge_lightning.algorithms.registry import get_algorithm, strategy_spec
from tests.algorithms.dflash_fixtures import V, context, make_batches, make_target

BS = 4


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("domino_target"))


def test_lambda_schedule():
    assert lambda_base(0, 100, 1.0, 0.5) == 1.0
    assert lambda_base(25, 100, 1.0, 0.5) == pytest.approx(0.5)
    assert lambda_base(50, 100, 1.0, 0.5) == 0.0 and lambda_base(80, 100, 1.0, 0.5) == 0.0
    assert lambda_base(10, 100, 0.8, 1.0) == pytest.approx(0.72)
    assert lambda_base(3, 1, 1.0, 0.5) == 0.0  # horizon max(1, int(0.5)) = 1
    assert lambda_base(0, None) == 0.0 and lambda_base(0, math.inf) == 0.0  # no horizon → 0, as upstream
    assert lambda_base(0, 100, 2.0, 0.5) == 1.0  # clamped to [0, 1]


def _module(target, **kw):
    torch.manual_seed(0)
    m = DominoModule(block_size=BS, num_anchors=6, emb_dim=8, gru_hidden_dim=12, mask_token_id=V - 1, **kw)
    m.build(context(target))
    return m


def _naive(module, batch, lam, gamma, shift):
    """Per block, per predicted position: label x[a+p+1], slot p+1-shift, GRU over emb(x[a..a+p])."""
    t = batch.tensors
    ids, lm = t["input_ids"], t["loss_mask"] * t["attention_mask"]
    d = module.draft
    anchors, keep = module.anchors_for(batch, step=5)
    hidden = d(ids, t["aux_hidden_states"], anchors, keep)
    S = ids.shape[1]
    P = BS - 1 + shift
    num_f = num_b = den = 0.0
    for b in range(ids.shape[0]):
        for n in range(anchors.shape[1]):
            if not keep[b, n]:
                continue
            a = int(anchors[b, n])
            for p in range(P):
                pos = a + p + 1
                if pos >= S or not lm[b, pos]:
                    continue
                h = d.norm(hidden[b, n, p + 1 - shift])
                base = h @ d.lm_head.weight.T
                _, state = d.prefix_gru(d.embed(ids[b, a : a + p + 1])[None])
                final = base + (d.embed_proj(torch.cat([h, state[0, 0]])) if p >= 1 else 0)
                w = 1.0 if gamma is None else math.exp(-p / gamma)
                y = ids[b, pos][None]
                num_f = num_f + w * F.cross_entropy(final[None], y)
                num_b = num_b + w * F.cross_entropy(base[None], y)
                den += w
    return ((1 - lam) * num_f + lam * num_b) / den, num_f / den, num_b / den


@pytest.mark.parametrize("shift_label,gamma", [(True, 7.0), (False, None)])
def test_mixed_loss_and_gradient_match_naive(target, shift_label, gamma):
    m = _module(target, shift_label=shift_label, loss_decay_gamma=gamma, objective_chunk_rows=5)
    m.current_lambda = lambda: 0.3
    batch = make_batches(1, seed=2)[0]
    out = m.compute_loss(batch, step=5)
    loss, final, base = _naive(m, batch, 0.3, gamma, 1 if shift_label else 0)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.final_numerator / out.denominator, final)
    torch.testing.assert_close(out.base_numerator / out.denominator, base)
    params = [p for p in m.draft.parameters()]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want = torch.autograd.grad(loss, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w)
    assert out.counts.correct.shape == (BS - 1 + (1 if shift_label else 0),)


def test_checkpoint_round_trip_and_registry(tmp_path, target):
    m = _module(target)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(m, DataLoader(make_batches(2), batch_size=None))
    trainer.save_checkpoint(tmp_path / "d.ckpt")
    back = DominoModule.load_from_checkpoint(tmp_path / "d.ckpt")
    assert isinstance(back.draft_config, DominoConfig) and back.draft_config == m.draft_config
    for k, v in m.draft.state_dict().items():
        torch.testing.assert_close(back.draft.state_dict()[k], v)
    assert get_algorithm("domino").module is DominoModule and strategy_spec("domino").min_supervised_run == 2
    hf = m.draft_config.hf_config()
    assert hf["dflash_config"]["projector_type"] == "domino" and hf["dflash_config"]["gru_hidden_dim"] == 12
