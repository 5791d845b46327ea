"""P-EAGLE through the CLI: an interrupted + resumed fit equals the straight one; fit -> evaluate -> export hf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specforge_lightning.algorithms.base import LoadOptions
from specforge_lightning.cli import main
from specforge_lightning.export.drafts import load_draft
from tests.algorithms.cli_runs import assert_resume_matches_straight, fit_tiny, logged, write_resume_config


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def write_config(root: Path, features: Path, interrupt_at: int | None) -> Path:
    # Real features of the tiny target (captured by the first fit): samples of many lengths, so batches pad.
    prepare = {"output_dir": str(features), "target": "tiny-llama", "corpus": "sharegpt", "num_samples": 16,
               "num_val_samples": 2, "max_length": 48, "draft_vocab_size": 128, "batch_size": 8, "shard_size": 16,
               "capture_dtype": "float32", "compute_dtype": "float32"}
    model = {"class_path": "specforge_lightning.algorithms.peagle.PEagleModule",
             "init_args": {"num_layers": 2, "num_depths": 3, "lr": 1e-2, "warmup_ratio": 0.2}}
    data = {"class_path": "specforge_lightning.datamodules.FeatureDataModule",
            "init_args": {"batch_size": 2, "prefetch": 0, "prepare": prepare}}
    return write_resume_config(root, interrupt_at, model, data, gradient_clip_val=1.0)


def test_interrupted_and_resumed_fit_matches_the_straight_run(tmp_path):
    features = tmp_path / "features"  # COD draws are seeded too, so they repeat after the resume
    wa = assert_resume_matches_straight(tmp_path, lambda root, at: write_config(root, features, at))
    assert "draft.mask_hidden" in wa and "draft.embed_tokens.weight" in wa


def test_tiny_fit_evaluate_export_through_the_cli(tmp_path):
    feats, run = tmp_path / "feats", tmp_path / "run"
    rows = fit_tiny("configs/peagle-tiny.yaml", feats, run)
    losses = logged(rows, "train/loss")
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
