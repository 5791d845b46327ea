"""DSpark through the CLI on the tiny target: fit -> evaluate -> export hf (bit-identical reload), and resume exactness."""

from __future__ import annotations

import json

import pytest
import torch

from specforge_lightning.algorithms.base import LoadOptions
from specforge_lightning.algorithms.dspark import DSparkModule
from specforge_lightning.cli import main
from specforge_lightning.errors import UserError
from specforge_lightning.export.drafts import load_draft
from tests.algorithms.cli_runs import (
    assert_resume_matches_straight,
    feature_data,
    fit_tiny,
    logged,
    write_resume_config,
)
from tests.integration.scripts.common import make_features


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_tiny_fit_evaluate_export(tmp_path, capsys):
    run = tmp_path / "run"
    rows = fit_tiny("configs/dspark-tiny.yaml", tmp_path / "feats", run,
                    "--trainer.max_steps=30", "--trainer.val_check_interval=15")
    losses = logged(rows, "train/loss")
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]), losses
    taus = logged(rows, "val/tau_probabilistic")
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


MODEL = {"class_path": "specforge_lightning.algorithms.dspark.DSparkModule",
         "init_args": {"block_size": 4, "num_anchors": 6, "markov_rank": 8, "markov_head_type": "rnn",
                       "lr": 1e-2, "warmup_ratio": 0.2}}


def test_interrupted_and_resumed_fit_matches_the_straight_run(tmp_path):
    features = tmp_path / "features"
    make_features(features)
    data = feature_data(features)
    wa = assert_resume_matches_straight(tmp_path, lambda root, at: write_resume_config(root, at, MODEL, data))
    assert any(k.startswith("draft.markov_head.") for k in wa)
