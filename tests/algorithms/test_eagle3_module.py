"""Eagle3Module against a tiny random Llama target saved to disk: fit, checkpoint, smart init, inference parity."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from specforge_lightning.algorithms.optim import warmup_cosine
from specforge_lightning.algorithms.eagle3 import Eagle3Module
from specforge_lightning.algorithms.eagle3.init import (
    CopyHead,
    CurrentTokenHead,
    Eagle3Initializer,
    TargetFC,
    TargetHead,
    TargetMidlayer,
    TargetNorm,
    assign_kv_heads,
)
from specforge_lightning.algorithms.eagle3.loss import compute_teacher, effective_loss_mask
from specforge_lightning.algorithms.eagle3.model import shift_left
from specforge_lightning.algorithms.registry import get_algorithm, strategy_spec
from specforge_lightning.contracts import FeatureContext, TrainBatch
from specforge_lightning.algorithms.metrics import simulated_acceptance_length

V, VD, H, LAYERS = 64, 24, 32, 4
AUX = (0, 1, 2)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A random 4-layer Llama saved as config.json + model.safetensors, its vocab mapping, and batches."""
    root = tmp_path_factory.mktemp("eagle3_target")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=H, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.3,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "target")
    used = torch.cat([torch.arange(0, 16), torch.arange(40, 48)])  # VD ids; the rest are outside
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[used] = True
    save_file({"d2t": used - torch.arange(VD), "t2d": t2d}, str(root / "vocab.safetensors"))
    context = FeatureContext(
        target_dir=str(root / "target"), target_id="tiny-llama", layer_ids=AUX, hidden_size=H, vocab_size=V,
        draft_vocab_size=VD, vocab_mapping_path=str(root / "vocab.safetensors"), capture_dtype="float32",
    )
    batches = [capture(model, seed) for seed in range(4)]
    return model, context, batches


def capture(model: LlamaForCausalLM, seed: int, B: int = 2, S: int = 12) -> TrainBatch:
    """Run the target like the capture side would: aux = outputs of AUX layers, last = final post-norm hidden."""
    g = torch.Generator().manual_seed(seed)
    lengths = [S, S - 3]
    attn = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        attn[b, :n] = 1
    ids = torch.randint(0, V, (B, S), generator=g) * attn
    outs = {}

    def keep(i: int):
        return lambda module, args, out: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    hooks = [model.model.layers[i].register_forward_hook(keep(i)) for i in AUX]
    with torch.no_grad():
        last = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    for h in hooks:
        h.remove()
    loss_mask = attn.clone()
    loss_mask[:, :3] = 0
    tensors = {
        "input_ids": ids, "loss_mask": loss_mask, "attention_mask": attn,
        "aux_hidden_states": torch.cat([outs[i] for i in AUX], -1).to(torch.bfloat16), "last_hidden_state": last,
    }
    return TrainBatch(sample_ids=[f"s{seed}-{b}" for b in range(B)], strategy="eagle3", tensors=tensors)


class ListData(L.LightningDataModule):
    def __init__(self, context: FeatureContext, batches: list[TrainBatch]) -> None:
        super().__init__()
        self.feature_context = context
        self.batches = batches

    def _loader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, collate_fn=lambda b: b)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


def trainer(**kw) -> L.Trainer:
    base = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=0.5,
    )
    return L.Trainer(**{**base, **kw})


def mean_loss(module: Eagle3Module, batches: list[TrainBatch]) -> float:
    with torch.no_grad():
        return sum(module.compute_loss(b).loss.item() for b in batches) / len(batches)


def test_registry_and_strategy_spec():
    assert get_algorithm("eagle3").module is Eagle3Module
    spec = strategy_spec("eagle3")
    assert spec.name == "eagle3" and spec.min_supervised_run == 1 and spec.layer_count == 3
    assert spec.resume_strict_hparams == ("ttt_length", "loss_decay", "loss_normalize")
    assert set(spec.features) == {"input_ids", "loss_mask", "aux_hidden_states", "last_hidden_state"}


def test_fit_lowers_loss_and_checkpoint_restores_without_build(target, tmp_path):
    model, context, batches = target
    L.seed_everything(0)
    module = Eagle3Module(ttt_length=3, lr=1e-2, warmup_ratio=0.1)
    data = ListData(context, batches)
    t = trainer(max_steps=20, limit_val_batches=2, val_check_interval=4)
    module.build(context)
    before = mean_loss(module, batches)
    t.fit(module, datamodule=data)
    after = mean_loss(module, batches)
    assert after < 0.85 * before, (before, after)
    assert {"train/loss", "train/acceptance_length", "train/acc_0", "val/loss", "val/acceptance_length"} <= set(
        t.callback_metrics
    )

    path = tmp_path / "eagle3.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert not any("embed_tokens" in k or "teacher_head" in k for k in ckpt["state_dict"])
    assert ckpt["eagle3"]["feature_context"]["target_dir"] == context.target_dir

    restored = Eagle3Module.load_from_checkpoint(path)  # no datamodule, no build()
    assert restored.hparams.ttt_length == 3
    for (k, a), (k2, b) in zip(module.state_dict().items(), restored.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(restored.teacher_head, module.teacher_head)
    assert torch.equal(restored.draft.embed_tokens.weight, module.draft.embed_tokens.weight)
    out_a, out_b = module.compute_loss(batches[0]), restored.compute_loss(batches[0])
    assert torch.equal(out_a.loss, out_b.loss) and torch.equal(out_a.correct, out_b.correct)

    # Resuming a fit: setup() builds from the datamodule, on_load_checkpoint only checks the config.
    resumed = Eagle3Module(ttt_length=3, lr=1e-2, warmup_ratio=0.1)
    t2 = trainer(max_steps=22, limit_val_batches=0)
    t2.fit(resumed, datamodule=data, ckpt_path=path)
    assert t2.global_step == 22


def test_validate_logs_count_based_acceptance(target):
    _, context, batches = target
    module = Eagle3Module(ttt_length=3)
    module.build(context)
    correct = sum(module.compute_loss(b).correct for b in batches)
    total = sum(module.compute_loss(b).total for b in batches)
    acc = (correct.double() / total.double()).tolist()
    [metrics] = trainer().validate(module, datamodule=ListData(context, batches), verbose=False)
    assert metrics["val/acceptance_length"] == pytest.approx(simulated_acceptance_length(acc), rel=1e-6)
    assert metrics["val/acc_2"] == pytest.approx(acc[2], rel=1e-6)


def test_smart_init_sets_expected_tensors(target):
    model, context, _ = target
    module = Eagle3Module(init=[TargetHead(), TargetNorm(), TargetFC(), TargetMidlayer(layer=-1)])
    module.build(context)
    d, sd = module.draft, model.state_dict()
    target_ids = torch.arange(VD) + d.d2t
    assert torch.equal(d.lm_head.weight, sd["lm_head.weight"][target_ids])
    assert torch.equal(d.norm.weight, sd["model.norm.weight"])
    assert torch.equal(d.fc.weight[:, 2 * H :], torch.eye(H)) and not d.fc.weight[:, : 2 * H].any()
    last = f"model.layers.{LAYERS - 1}."
    assert torch.equal(d.midlayer.self_attn.v_proj.weight[:, H:], sd[last + "self_attn.v_proj.weight"])
    assert torch.equal(d.midlayer.mlp.gate_proj.weight, sd[last + "mlp.gate_proj.weight"])
    assert torch.equal(d.embed_tokens.weight, sd["model.embed_tokens.weight"])
    assert torch.equal(module.teacher_head, sd["lm_head.weight"])
    plain = Eagle3Module()
    plain.build(context)
    assert not torch.equal(plain.draft.lm_head.weight, sd["lm_head.weight"][target_ids])


def test_teacher_is_the_target_next_token_distribution(target):
    """The teacher at t is the target's own prediction at t+1 (logits of the saved LlamaForCausalLM)."""
    model, context, batches = target
    module = Eagle3Module(ttt_length=1)
    module.build(context)
    b = batches[0].tensors
    mask = effective_loss_mask(b["loss_mask"], b["attention_mask"])
    teacher = compute_teacher(b["last_hidden_state"], module.teacher_head, module.draft.t2d, mask, chunk_size=5)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    expect = shift_left(logits.argmax(-1), 1)
    assert torch.equal(teacher.target_ids * mask, expect * mask)


def test_draft_step_matches_ttt_step0_through_the_module(target):
    _, context, batches = target
    module = Eagle3Module(ttt_length=2)
    module.build(context)
    b = batches[1].tensors
    ids, aux = b["input_ids"][:1], b["aux_hidden_states"][:1]
    with torch.no_grad():
        [(logits0, hidden0), _] = module.draft.ttt_forward(ids, aux, length=2)
    logits, hidden, cache = module.draft.draft_step(shift_left(ids, 1), aux, torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(logits, logits0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, hidden0, atol=1e-5, rtol=1e-5)


def test_lr_schedule_warmup_then_cosine():
    assert warmup_cosine(0, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 0.1, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(32, 64, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    # A spent time share further along than the steps moves the cosine; warmup ignores it.
    assert warmup_cosine(10, 100, 0.1, min_progress=0.5) == pytest.approx(0.5)
    assert warmup_cosine(55, 100, 0.1, min_progress=0.2) == pytest.approx(0.5)
    assert warmup_cosine(5, 100, 0.1, min_progress=0.9) == pytest.approx(0.6)


class LRTrace(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_anneal_by_time_ends_a_time_capped_run_at_the_minimum_lr(target):
    model, context, batches = target
    trace = LRTrace()
    module = Eagle3Module(ttt_length=2, lr=1e-3, warmup_ratio=0.0, anneal_by_time=True)
    t = trainer(max_time={"seconds": 3}, max_steps=100_000, limit_val_batches=0, callbacks=[trace])
    t.fit(module, datamodule=ListData(context, batches))
    assert 10 < t.global_step < 100_000  # stopped by the budget, far from the step horizon
    # The step fraction alone would leave the LR at ~1e-3; the time share brings it to ~0.
    assert trace.lrs[0] > 0.9e-3 and trace.lrs[-1] < 0.05e-3
    assert all(b <= a + 1e-12 for a, b in zip(trace.lrs, trace.lrs[1:]))


class GradNorms(L.Callback):
    """The gradient norm the optimizer stepped with (after clipping; zeroed only at the next step)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in pl_module.draft.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_bf16_mixed_clips_gradients_with_the_fused_optimizer(target):
    # Lightning's mixed-precision plugin refuses to clip for a fused optimizer; the module clips
    # itself when no loss scaler exists (the quickstart: bf16-mixed, gradient_clip_val 0.5).
    model, context, batches = target
    norms = GradNorms()
    module = Eagle3Module(ttt_length=2, lr=1e-3)
    t = trainer(max_steps=3, limit_val_batches=0, precision="bf16-mixed", gradient_clip_val=1e-3, callbacks=[norms])
    t.fit(module, datamodule=ListData(context, batches))
    assert t.global_step == 3 and t.optimizers[0].defaults["fused"]
    assert len(norms.norms) == 3 and max(norms.norms) <= 1e-3 * 1.001
    # Unclipped, the first step's norm is far larger.
    free = GradNorms()
    trainer(max_steps=1, limit_val_batches=0, precision="bf16-mixed", gradient_clip_val=None, callbacks=[free]).fit(
        Eagle3Module(ttt_length=2, lr=1e-3), datamodule=ListData(context, batches)
    )
    assert free.norms[0] > 0.1


def test_anneal_by_time_without_a_time_budget_is_refused(target):
    model, context, batches = target
    module = Eagle3Module(ttt_length=2, anneal_by_time=True)
    with pytest.raises(ValueError, match="trainer.max_time"):
        trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=ListData(context, batches))


class SampledData(ListData):
    """ListData that also hands out training samples for data-dependent init, counting the calls."""

    def __init__(self, context: FeatureContext, batches: list[TrainBatch], model: LlamaForCausalLM) -> None:
        super().__init__(context, batches)
        self.model, self.calls = model, 0

    def sample_features(self, num_samples: int, split: str = "train", keys=None) -> list[dict[str, torch.Tensor]]:
        self.calls += 1
        rows = [capture(self.model, 100 + i, S=24).tensors for i in range(num_samples)]
        return [{k: t[k][0] for k in keys} for t in rows]  # row 0 is unpadded


def test_copy_head_is_planted_on_a_fresh_fit_only(target, tmp_path):
    model, context, batches = target
    data = SampledData(context, batches, model)
    hp = dict(ttt_length=2, init=[TargetHead(), TargetNorm(), CopyHead(samples=8, previous=0.5)])
    module = Eagle3Module(**hp)
    t = trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, default_root_dir=tmp_path)
    t.fit(module, datamodule=data)
    assert data.calls == 1
    assert not module.draft.midlayer.self_attn.k_proj.weight[:8, :H].abs().gt(1e-2).any()  # planted key: hidden half
    path = tmp_path / "copy.ckpt"
    t.save_checkpoint(path)
    # The initialisers sit in the hyperparameters in plain form: the file loads with weights_only.
    assert torch.load(path, weights_only=True)["hyper_parameters"]["init"] == [x.spec() for x in hp["init"]]
    assert Eagle3Module.load_from_checkpoint(path).initializers == hp["init"]
    trainer(max_steps=3, limit_val_batches=1, val_check_interval=1, default_root_dir=tmp_path).fit(
        Eagle3Module(**hp), datamodule=data, ckpt_path=path
    )
    assert data.calls == 1  # resuming restores the weights; nothing is planted again


def test_current_token_head_is_planted_next_to_the_copy_head(target, tmp_path):
    model, context, batches = target
    data = SampledData(context, batches, model)
    both = Eagle3Module(
        ttt_length=2, init=[TargetHead(), TargetNorm(), CurrentTokenHead(samples=16), CopyHead(samples=16)]
    )
    trainer(max_steps=1, limit_val_batches=1, val_check_interval=1, default_root_dir=tmp_path).fit(both, datamodule=data)
    assert data.calls == 1  # both heads are fitted on one read of the samples
    k = both.draft.midlayer.self_attn.k_proj.weight
    head_dim = both.draft_config.head_dim
    assert not k[:head_dim, :H].abs().gt(1e-2).any()  # key/value head 0: the copy head keys on the hidden half
    assert not k[head_dim : 2 * head_dim, H:].abs().gt(1e-2).any()  # head 1: the current-token head, embedding half
    alone = Eagle3Module(ttt_length=2, init=[TargetHead(), TargetNorm(), CurrentTokenHead(samples=16)])
    trainer(max_steps=1, limit_val_batches=1, val_check_interval=1, default_root_dir=tmp_path).fit(alone, datamodule=data)
    assert not alone.draft.midlayer.self_attn.k_proj.weight[:head_dim, H:].abs().gt(1e-2).any()  # alone: head 0


def test_negative_previous_weight_is_refused_before_any_work():
    with pytest.raises(ValueError, match="CopyHead previous must be >= 0"):
        Eagle3Module(init=[CopyHead(previous=-0.5)])


def test_copy_head_needs_samples_before_training(target):
    _, context, batches = target
    module = Eagle3Module(init=[CopyHead()])
    with pytest.raises(ValueError, match="CopyHead needs training samples"):
        trainer(max_steps=1).fit(module, datamodule=ListData(context, batches))
    module = Eagle3Module(init=[CurrentTokenHead()])
    with pytest.raises(ValueError, match="CurrentTokenHead needs training samples"):
        trainer(max_steps=1).fit(module, datamodule=ListData(context, batches))


def test_both_planted_heads_need_two_key_value_heads(target):
    model, context, batches = target
    module = Eagle3Module(init=[TargetHead(), TargetNorm(), CurrentTokenHead(), CopyHead()])
    module.build(context)
    module.draft_config = dataclasses.replace(module.draft_config, num_key_value_heads=1, num_attention_heads=4)
    with pytest.raises(ValueError, match="each need their own key/value head; this draft has 1"):
        module.plant_heads(SampledData(context, batches, model))


def test_ttt_full_every_unrolls_the_last_step_on_every_nth_optimizer_step(target):
    model, context, batches = target
    module = Eagle3Module(ttt_length=3, ttt_full_every=3, lr=1e-3)
    lengths = []
    compute_loss = Eagle3Module.compute_loss

    def record(self, batch, length=None):
        lengths.append((self.training, length))
        return compute_loss(self, batch, length)

    module.compute_loss = record.__get__(module)
    t = trainer(max_steps=7, limit_val_batches=2)  # validation after the first epoch (4 batches)
    t.fit(module, datamodule=ListData(context, batches))
    assert [n for training, n in lengths if training] == [3, 2, 2, 3, 2, 2, 3]
    assert [n for training, n in lengths if not training] == [None, None]  # validation: always all 3
    # This epoch's (steps 4-6) train counts of the last position come from step 6 alone.
    total = module.train_acceptance.total
    assert 0 < int(total[2]) < 0.6 * int(total[1])
    assert "val/acc_2" in t.callback_metrics
    with pytest.raises(ValueError, match="ttt_full_every"):
        Eagle3Module(ttt_length=3, ttt_full_every=0)


def test_kv_heads_go_to_explicit_claims_then_copy_heads_then_list_order():
    # The recipe's order: the current-token head is planted first, but the copy head keeps head 0.
    assert assign_kv_heads([TargetHead(), TargetNorm(), CurrentTokenHead(), CopyHead()], 2) == [None, None, 1, 0]
    assert assign_kv_heads([CopyHead()], 2) == [0] and assign_kv_heads([CurrentTokenHead()], 2) == [0]
    assert assign_kv_heads([CurrentTokenHead(kv_head=0), CopyHead()], 2) == [0, 1]
    assert assign_kv_heads([CopyHead(), CopyHead()], 3) == [0, 1]
    assert assign_kv_heads([CurrentTokenHead(), CopyHead(kv_head=2), CopyHead()], 3) == [1, 2, 0]
    assert assign_kv_heads([TargetHead(), TargetFC()], 1) == [None, None]


def test_conflicting_or_impossible_kv_heads_are_refused(target):
    claim = r"init\[0\] \(CurrentTokenHead\) and \[1\] \(CopyHead\) both claim key/value head 1"
    with pytest.raises(ValueError, match=claim):
        assign_kv_heads([CurrentTokenHead(kv_head=1), CopyHead(kv_head=1)], 2)
    with pytest.raises(ValueError, match="CopyHead kv_head 2 is outside the draft's 2 key/value heads"):
        assign_kv_heads([CopyHead(kv_head=2)], 2)
    with pytest.raises(ValueError, match="each need their own key/value head; this draft has 2"):
        assign_kv_heads([CopyHead(), CopyHead(kv_head=1), CurrentTokenHead()], 2)
    with pytest.raises(ValueError, match="kv_head must be >= 0"):
        CopyHead(kv_head=-1)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        CurrentTokenHead(samples=0)
    # Refused before any sample is read.
    model, context, batches = target
    module = Eagle3Module(init=[CurrentTokenHead(kv_head=0), CopyHead(kv_head=0)])
    module.build(context)
    data = SampledData(context, batches, model)
    with pytest.raises(ValueError, match="both claim key/value head 0"):
        module.plant_heads(data)
    assert data.calls == 0


def test_recipe_yaml_parses_into_its_four_initialisers():
    import yaml
    from jsonargparse import ArgumentParser

    from tests.golden.runner import ROOT

    recipe = yaml.safe_load((ROOT / "configs/eagle3.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--model", type=L.LightningModule)
    module = parser.instantiate_classes(parser.parse_object({"model": recipe["model"]})).model
    assert isinstance(module, Eagle3Module) and module.hparams.ttt_length == 2
    assert module.initializers == [TargetHead(), TargetNorm(), CurrentTokenHead(strength=8.0), CopyHead(previous=0.5)]
    assert module.initializers[2].samples == module.initializers[3].samples == 128
    assert module.initializers[3].spec() == {
        "class_path": "specforge_lightning.algorithms.eagle3.init.CopyHead",
        "init_args": {"samples": 128, "strength": 2.0, "sharpness": 3.0, "previous": 0.5, "kv_head": None},
    }


def test_plain_initialiser_specs_round_trip_and_unknown_ones_are_named():
    inits = [TargetMidlayer(layer=1, emb_half_scale=0.1), TargetFC(chunk=0), CopyHead(samples=4)]
    assert [Eagle3Initializer.from_spec(x.spec()) for x in inits] == inits
    assert Eagle3Initializer.from_spec({"class_path": "TargetNorm"}) == TargetNorm()
    assert repr(inits[1]) == "TargetFC(chunk=0)"
    with pytest.raises(ValueError, match="model.init_args.init: unknown initialiser 'os.system'"):
        Eagle3Initializer.from_spec({"class_path": "os.system", "init_args": {}})
