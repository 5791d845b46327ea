"""DSpark through the CLI on the tiny target: fit -> evaluate -> export hf (bit-identical reload), and resume exactness."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from specforge_lightning.algorithms.base import LoadOptions
from specforge_lightning.algorithms.dspark import DSparkModule
from specforge_lightning.cli import main
from specforge_lightning.errors import UserError
from specforge_lightning.export.drafts import load_draft
from tests.integration.scripts.common import KeyboardInterruptLike, make_features, prepare_config, read_rows

MAX_STEPS = 6


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_tiny_fit_evaluate_export(tmp_path, capsys):
    run = tmp_path / "run"
    main([
        "fit", "--config", "configs/dspark-tiny.yaml",
        f"--data.init_args.prepare.output_dir={tmp_path / 'feats'}",
        f"--trainer.default_root_dir={run}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_steps=30", "--trainer.val_check_interval=15", "--trainer.log_every_n_steps=1",
    ])
    (metrics,) = run.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]), losses
    taus = [float(r["val/tau_probabilistic"]) for r in rows if r.get("val/tau_probabilistic")]
    assert len(taus) == 2 and all(1.0 <= t <= 5.0 for t in taus)
    for key in ("train/l1_loss", "train/confidence_loss", "val/teacher_agreement", "val/ce_position_3", "train/acc_3"):
        assert any(r.get(key) for r in rows), key
    ckpt = run / "checkpoints" / "last.ckpt"
    back = DSparkModule.load_from_checkpoint(ckpt)
    assert back.draft_config.block_size == 4 and back.draft.markov_head is not None

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["What is a draft model?", "Say hello."]) + "\n")
    out = tmp_path / "eval.json"
    main(["evaluate", "--ckpt_path", str(ckpt), "--output", str(out), "--prompts", str(prompts),
          "--max_new_tokens", "12", "--k", "4", "--dtype", "float32", "--threads", "1", "--device", "cpu",
          "--no_warmup"])
    result = json.loads(out.read_text())
    assert result["identical_outputs"] == result["num_prompts"] == 2
    assert "Markov head" in result["settings"]["drafting"] and result["acceptance_length"] >= 1.0

    hf = tmp_path / "hf"
    main(["export", "--ckpt_path", str(ckpt), "--format", "hf", "--output_dir", str(hf)])
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["algorithm"] == "dspark" and cfg["dflash_config"]["projector_type"] == "dspark"
    assert cfg["markov_rank"] == 16 and cfg["markov_head_type"] == "vanilla" and cfg["enable_confidence_head"]
    reloaded = load_draft(hf, LoadOptions())[1].draft
    want, got = back.draft.export_state_dict(), reloaded.export_state_dict()
    assert want.keys() == got.keys() and any(k.startswith("markov_head.") for k in got)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # The tiny Llama target has no q/k norms, which SGLang's DFlash layers always apply: refused, with the fix.
    capsys.readouterr()
    with pytest.raises((SystemExit, UserError)):
        main(["export", "--ckpt_path", str(ckpt), "--format", "sglang", "--output_dir", str(tmp_path / "sgl")])
    assert "qk_norm: true" in capsys.readouterr().err


def write_config(root: Path, features: Path, interrupt_at: int | None) -> Path:
    prepare = {k: v for k, v in asdict(prepare_config(features)).items() if k != "extra"}
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
        },
        "model": {"class_path": "specforge_lightning.algorithms.dspark.DSparkModule",
                  "init_args": {"block_size": 4, "num_anchors": 6, "markov_rank": 8, "markov_head_type": "rnn",
                                "lr": 1e-2, "warmup_ratio": 0.2}},
        "data": {"class_path": "specforge_lightning.datamodules.FeatureDataModule",
                 "init_args": {"batch_size": 2, "auto_prepare": False, "prepare": prepare}},
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
    make_features(features)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    main(["fit", "--config", str(write_config(straight, features, None))])
    with pytest.raises(KeyboardInterruptLike):
        main(["fit", "--config", str(write_config(resumed, features, interrupt_at=3))])
    main(["fit", "--config", str(write_config(resumed, features, None)), "--ckpt_path", "last"])

    a, b = read_rows(straight / "rows.jsonl"), read_rows(resumed / "rows.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 3, 4, 5, 6]  # step 3 is redone from the step-2 checkpoint
    by_step = {r["step"]: r for r in b[3:]}
    for r in a[2:]:  # the same samples and the same losses after the resume
        assert by_step[r["step"]]["ids"] == r["ids"] and by_step[r["step"]]["loss"] == r["loss"]
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() and any(k.startswith("draft.markov_head.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
