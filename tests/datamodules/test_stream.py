"""StreamDataModule: the shipped configs parse; a colocated run saves features an offline run reuses."""

from __future__ import annotations

import lightning as L
import pytest

from tests.data.stream_fakes import REPO


@pytest.mark.parametrize("name, source", [("eagle3-tiny-colocated.yaml", "colocated"), ("eagle3-tiny-stream.yaml", "ledger")])
def test_fit_configs_parse(name, source, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["specforge_lightning"])

    from specforge_lightning.datamodules import StreamDataModule

    cli = LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=["--config", str(REPO / "configs" / name), "--trainer.logger=false"])
    assert isinstance(cli.datamodule, StreamDataModule) and cli.datamodule.source == source
    assert cli.datamodule.prepare_cfg.target == "tiny-llama"


def _fit(datamodule, steps, callbacks=()):
    from specforge_lightning.algorithms.eagle3 import Eagle3Module

    L.seed_everything(0, verbose=False)
    module = Eagle3Module(ttt_length=2, lr=1e-3)
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Losses(), *callbacks])
    trainer.fit(module, datamodule=datamodule)
    return losses, trainer


def test_colocated_save_dir_is_reused_offline(tmp_path, monkeypatch):
    from specforge_lightning.callbacks.stream_health import StreamHealth
    from specforge_lightning.data.manifest import read_manifest
    from specforge_lightning.datamodules import FeatureDataModule, StreamDataModule
    from specforge_lightning.target import engine as engine_mod
    from specforge_lightning.target.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(output_dir=str(tmp_path / "saved"), target="tiny-llama", num_samples=6, num_val_samples=2,
                        max_length=32, draft_vocab_size=64, batch_size=4, shard_size=4, capture_dtype="float32",
                        compute_dtype="float32", layer_preset="eagle3")
    health = StreamHealth()
    dm = StreamDataModule(source="colocated", prepare=cfg, batch_size=2, save_dir=cfg.output_dir)
    online, trainer = _fit(dm, 3, [health])
    manifest = read_manifest(cfg.output_dir)
    assert manifest["complete"] and len(manifest["splits"]["train"]["shards"]) == 2
    assert len(manifest["splits"]["val"]["shards"]) == 1
    assert {"stream/data_wait_s", "stream/data_wait_fraction", "stream/queue_depth", "stream/acked",
            "stream/producer_samples_per_s"} <= set(trainer.callback_metrics)
    assert health.summary()["steps"] == 3 and health.summary()["acked"] == 6

    def no_capture(*a, **kw):
        raise AssertionError("the saved features must be reused, not captured again")

    monkeypatch.setattr(engine_mod.HFTargetEngine, "from_path", no_capture)
    assert prepare(cfg, progress=False)["complete"]  # prepare sees a finished directory
    offline, _ = _fit(FeatureDataModule(prepare=cfg, batch_size=2, shuffle=False, prefetch=0), 3)
    assert offline == online
