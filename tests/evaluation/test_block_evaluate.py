"""``evaluate`` on DFlash / Domino drafts: the checkpoint's algorithm picks block drafting; JSON keys; hf folder agrees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from specforge_lightning import cli
from specforge_lightning.algorithms.dflash import DFlashModule
from specforge_lightning.algorithms.dflash.drafter import BLOCK_DRAFTING, BLOCK_SIMULATED_DEFINITION
from specforge_lightning.algorithms.domino import DominoModule
from specforge_lightning.contracts import FeatureContext
from specforge_lightning.target.zoo import TINY_LLAMA, resolve_target
from tests.export.test_export import save_fitted

LAYER_IDS = (1, 3, 5)  # spread:3 on the 8-layer tiny-llama
V, H = 512, 64
KEYS = {"acceptance_length", "simulated_acceptance_length", "per_position_acceptance", "speedup", "settings",
        "simulated_acceptance_length_definition", "teacher_forced_accuracy", "per_prompt"}


def make_block_checkpoint(root: Path, cls: type[DFlashModule]) -> Path:
    """A DFlash-family module against ``tiny-llama``, fitted one step by a real Trainer, saved."""
    root.mkdir(parents=True, exist_ok=True)
    context = FeatureContext(
        target_dir=str(resolve_target(TINY_LLAMA)), target_id=TINY_LLAMA, layer_ids=LAYER_IDS, hidden_size=H,
        vocab_size=V, draft_vocab_size=V, capture_dtype="float32", max_length=64,
    )
    module = cls(block_size=4, num_anchors=8, lr=1e-3)
    module.build(context)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, V, (2, 16), generator=g),
        "loss_mask": torch.ones(2, 16, dtype=torch.long),
        "aux_hidden_states": torch.randn(2, 16, len(LAYER_IDS) * H, generator=g),
    }
    return save_fitted(module, batch, root)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("block_evaluate")
    fit = {"model": {"class_path": "specforge_lightning.algorithms.dflash.DFlashModule"},
           "data": {"init_args": {"prepare": {"target": TINY_LLAMA, "max_length": 64}}}}
    config = root / "fit.yaml"
    config.write_text(yaml.safe_dump(fit))
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["What is a draft model?", "Say hello."]) + "\n")
    return config, prompts


def run(config: Path, prompts: Path, ckpt: Path | str, out: Path) -> dict:
    cli.main(["evaluate", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(out),
              "--prompts", str(prompts), "--max_new_tokens", "8", "--k", "3", "--dtype", "float32",
              "--threads", "1", "--device", "cpu", "--no_warmup"])
    return json.loads(out.read_text())


@pytest.mark.parametrize("cls", [DFlashModule, DominoModule])
def test_evaluate_block_checkpoint_and_hf_folder(setup, tmp_path, cls):
    config, prompts = setup
    ckpt = make_block_checkpoint(tmp_path / "ckpt", cls)
    a = run(config, prompts, ckpt, tmp_path / "a.json")
    assert KEYS <= set(a)
    assert a["num_prompts"] == 2 and a["identical_outputs"] == 2
    assert a["settings"]["drafting"] == BLOCK_DRAFTING and (a["settings"]["num_steps"], a["settings"]["num_draft_tokens"]) == (3, 4)
    assert a["simulated_acceptance_length_definition"] == BLOCK_SIMULATED_DEFINITION
    assert a["acceptance_length"] >= 1.0 and a["simulated_acceptance_length"] >= 1.0
    assert len(a["per_position_acceptance"]) == 3 and len(a["teacher_forced_accuracy"]) == 3
    assert a["draft"]["kind"] == "checkpoint" and a["draft"]["aux_layer_ids"] == list(LAYER_IDS)
    assert a["draft"]["target_id"] == TINY_LLAMA
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    folder = tmp_path / "hf"
    cli.main(["export", "--ckpt_path", str(ckpt), "--format", "hf", "--output_dir", str(folder)])
    b = run(config, prompts, folder, tmp_path / "b.json")
    assert b["draft"]["kind"] == "hf" and b["draft"]["aux_layer_ids"] == list(LAYER_IDS)
    assert [p["output_ids"] for p in a["per_prompt"]] == [p["output_ids"] for p in b["per_prompt"]]
    assert a["per_position_counts"] == b["per_position_counts"]
    assert a["teacher_forced_counts"] == b["teacher_forced_counts"]


def test_evaluate_refuses_trees_for_a_chain_only_algorithm(setup, tmp_path, capsys):
    config, prompts = setup
    ckpt = make_block_checkpoint(tmp_path / "ckpt", DFlashModule)
    with pytest.raises(SystemExit) as err:
        cli.main(["evaluate", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(tmp_path / "x.json"),
                  "--prompts", str(prompts), "--topk", "2", "--num_draft_tokens", "8", "--device", "cpu"])
    printed = capsys.readouterr().err
    assert err.value.code == 2 and "need tree drafting, which dflash drafts do not support" in printed
