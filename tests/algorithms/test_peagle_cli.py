"""P-EAGLE through the CLI: an interrupted + resumed fit equals the straight one; fit -> evaluate -> export hf."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from specforge_lightning.algorithms.base import LoadOptions
from specforge_lightning.cli import main
from specforge_lightning.export.drafts import load_draft
from tests.integration.scripts.common import KeyboardInterruptLike, read_rows

MAX_STEPS = 6


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def write_config(root: Path, features: Path, interrupt_at: int | None) -> Path:
    # Real features of the tiny target (captured by the first fit): samples of many lengths, so batches pad.
    prepare = {"output_dir": str(features), "target": "tiny-llama", "corpus": "sharegpt", "num_samples": 16,
               "num_val_samples": 2, "max_length": 48, "draft_vocab_size": 128, "batch_size": 8, "shard_size": 16,
               "capture_dtype": "float32", "compute_dtype": "float32"}
    callbacks = [
        {"class_path": "tests.integration.scripts.common.SampleLog",
         "init_args": {"path": str(root / "rows.jsonl"), "draw_random": False}},
        {"class_path": "specforge_lightning.callbacks.ResumeState"},
        {"class_path": "specforge_lightning.callbacks.SpecForgeCheckpoint", "init_args": {"every_n_train_steps": 2}},
    ]
    if interrupt_at is not None:
        callbacks.append({"class_path": "tests.integration.scripts.common.Interrupt", "init_args": {"step": interrupt_at}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": MAX_STEPS, "logger": False, "precision": "32-true",
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "limit_val_batches": 0, "default_root_dir": str(root / "run"), "callbacks": callbacks,
            "gradient_clip_val": 1.0,
        },
        "model": {"class_path": "specforge_lightning.algorithms.peagle.PEagleModule",
                  "init_args": {"num_layers": 2, "num_depths": 3, "lr": 1e-2, "warmup_ratio": 0.2}},
        "data": {"class_path": "specforge_lightning.datamodules.FeatureDataModule",
                 "init_args": {"batch_size": 2, "prefetch": 0, "prepare": prepare}},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("draft.")}


def test_interrupted_and_resumed_fit_matches_the_straight_run(tmp_path):
    features = tmp_path / "features"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    main(["fit", "--config", str(write_config(straight, features, None))])
    with pytest.raises(KeyboardInterruptLike):
        main(["fit", "--config", str(write_config(resumed, features, interrupt_at=3))])
    main(["fit", "--config", str(write_config(resumed, features, None)), "--ckpt_path", "last"])

    a, b = read_rows(straight / "rows.jsonl"), read_rows(resumed / "rows.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 3, 4, 5, 6]  # step 3 is redone from the step-2 checkpoint
    by_step = {r["step"]: r for r in b[3:]}
    for r in a[2:]:  # the same samples, COD draws and losses after the resume
        assert by_step[r["step"]]["ids"] == r["ids"] and by_step[r["step"]]["loss"] == r["loss"]
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() and "draft.mask_hidden" in wa and "draft.embed_tokens.weight" in wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_tiny_fit_evaluate_export_through_the_cli(tmp_path):
    feats, run = tmp_path / "feats", tmp_path / "run"
    main([
        "fit", "--config", "configs/peagle-tiny.yaml", f"--data.init_args.prepare.output_dir={feats}",
        f"--trainer.default_root_dir={run}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
    ])
    (metrics,) = run.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    assert [r for r in rows if r.get("val/acceptance_length")] and any(r.get("train/acc_2") for r in rows)
    ckpt = run / "checkpoints" / "last.ckpt"

    fit_config = tmp_path / "fit.yaml"
    fit_config.write_text(Path("configs/peagle-tiny.yaml").read_text().replace(
        "      target: tiny-llama", f"      output_dir: {feats}\n      target: tiny-llama"))
    out = tmp_path / "eval" / "al.json"
    main(["evaluate", "--config", str(fit_config), "--ckpt_path", str(ckpt), "--output", str(out), "--num_prompts", "2",
          "--max_new_tokens", "12", "--k", "3", "--dtype", "float32", "--threads", "1", "--device", "cpu"])
    result = json.loads(out.read_text())
    assert result["draft"]["algorithm"] == "peagle" and result["settings"]["drafting"].startswith("parallel")
    assert result["identical_outputs"] == result["num_prompts"] == 2

    main(["export", "--ckpt_path", str(ckpt), "--format", "hf", "--output_dir", str(tmp_path / "hf")])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["PEagleDraftModel"] and cfg["num_hidden_layers"] == 2 and cfg["num_depths"] == 3
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    draft = load_draft(tmp_path / "hf", LoadOptions())[1].draft
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, stored["draft." + name]), name
