"""DFlashModule: global loss normalisation through a real Trainer, checkpoints, MASK resolution, the registry."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from specforge_lightning.algorithms.dflash import DFlashModule, resolve_mask_token_id
from specforge_lightning.algorithms.registry import get_algorithm, strategy_spec
from tests.algorithms.dflash_fixtures import V, context, make_batches, make_target


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("dflash_target"))


class _Probe(DFlashModule):
    """Keeps the gradients as the optimizer will see them (after the global rescale)."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.seen = {n: p.grad.clone() for n, p in self.draft.named_parameters()}


def _trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, **kw,
    )


@pytest.mark.parametrize("loss_type", ["dflash", "dpace"])
def test_gradient_is_normalised_by_the_global_denominator_across_accumulation(tmp_path, target, loss_type):
    kw = dict(block_size=4, num_anchors=20, loss_type=loss_type, loss_decay_gamma=3.0, mask_token_id=V - 1)
    torch.manual_seed(0)
    probe = _Probe(**kw)
    probe.build(context(target))
    torch.manual_seed(0)
    ref = DFlashModule(**kw)
    ref.build(context(target))
    ref.load_state_dict(probe.state_dict())
    batches = make_batches(2)
    _trainer(tmp_path, accumulate_grad_batches=2).fit(probe, DataLoader(batches, batch_size=None))

    params = dict(ref.draft.named_parameters())
    outs = [ref.compute_loss(b, step=0) for b in batches]
    total = sum(o.numerator for o in outs) / sum(o.denominator for o in outs)
    grads = dict(zip(params, torch.autograd.grad(total, list(params.values()))))
    for n in params:
        torch.testing.assert_close(probe.seen[n], grads[n], msg=n)
    if loss_type == "dflash":  # the mean of per-micro-batch means would be a different gradient
        outs = [ref.compute_loss(b, step=0) for b in batches]
        assert float(outs[0].denominator) != pytest.approx(float(outs[1].denominator))
        naive = torch.autograd.grad(sum(o.loss for o in outs) / 2, [params["fc.weight"]])[0]
        assert not torch.allclose(naive, grads["fc.weight"], rtol=1e-3, atol=0)


def test_checkpoint_round_trip_rebuilds_from_the_stored_context(tmp_path, target):
    torch.manual_seed(0)
    module = DFlashModule(block_size=4, num_anchors=5, num_layers=2)
    module.build(context(target))
    trainer = _trainer(tmp_path)
    trainer.fit(module, DataLoader(make_batches(1), batch_size=None))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert not any("embed_tokens" in k or "lm_head" in k for k in ckpt["state_dict"])  # frozen: never stored
    back = DFlashModule.load_from_checkpoint(path)
    assert back.draft_config == module.draft_config and back.draft_config.num_hidden_layers == 2
    for k, v in module.draft.state_dict().items():
        torch.testing.assert_close(back.draft.state_dict()[k], v)
    torch.testing.assert_close(back.draft.lm_head.weight, module.draft.lm_head.weight)
    batch = make_batches(1, seed=3)[0]
    torch.testing.assert_close(back.compute_loss(batch, step=-1).loss, module.compute_loss(batch, step=-1).loss)


def test_mask_token_resolution_order(target):
    assert resolve_mask_token_id(target, V, explicit=7) == 7  # explicit (model / draft config) wins
    assert resolve_mask_token_id(target, V) == 3  # tokenizer has 3 tokens: the first unused embedding row
    assert resolve_mask_token_id(target, 3) == 1  # no unused row, no pad → eos ("b")
    with pytest.raises(ValueError, match="MASK"):
        resolve_mask_token_id(target, V, explicit=V)


def test_registry_and_strategy_spec():
    assert get_algorithm("dflash").module is DFlashModule
    spec = strategy_spec("dflash")
    assert spec.min_supervised_run == 2 and spec.layer_preset.startswith("spread:")
    assert set(spec.features) == {"input_ids", "loss_mask", "aux_hidden_states"}
    assert spec.accepts([0, 1, 1, 0]) and not spec.accepts([1, 0, 1, 0])
