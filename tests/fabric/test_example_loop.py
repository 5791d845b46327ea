"""examples/fabric_custom_loop.py: the loop a user copies trains as the fabric command does, and fit resumes it.

On configs/eagle3-tiny.yaml features (validation every 2 batches): 6 steps by the example and
6 by ``fabric`` give bit-identical checkpoints; ``fit --ckpt_path=last`` then goes on from the
example's checkpoint and the example from that ``fit`` one, ending where ``fabric`` alone does.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from specforge_lightning.cli import main as cli
from tests.fabric.common import same_weights

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fabric_custom_loop.py"


def example():
    spec = importlib.util.spec_from_file_location("fabric_custom_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    out = tmp_path_factory.mktemp("example_loop") / "features"
    cli(["prepare", "--config", "configs/eagle3-tiny.yaml", f"--output_dir={out}"])
    return out


def args(feats: Path, root: Path, *extra: str) -> list[str]:
    return ["--config", "configs/eagle3-tiny.yaml", f"--data.init_args.prepare.output_dir={feats}",
            f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--trainer.val_check_interval=2",
            "--checkpoint.every_n_train_steps=3", *extra]


def last(root: Path) -> dict:
    ckpts = root / "checkpoints"
    return torch.load(ckpts / json.loads((ckpts / "last.json").read_text())["path"], weights_only=True)


def test_example_loop_matches_fabric_and_fit_resumes_it_and_back(feats, tmp_path):
    loop = example()
    loop.main(args(feats, tmp_path / "example", "--trainer.max_steps=6"))
    cli(["fabric", *args(feats, tmp_path / "fabric", "--trainer.max_steps=6")])
    mine, theirs = last(tmp_path / "example"), last(tmp_path / "fabric")
    assert mine["global_step"] == theirs["global_step"] == 6
    assert same_weights(mine["state_dict"], theirs["state_dict"]) and mine["loops"] == theirs["loops"]
    assert json.loads((tmp_path / "example" / "checkpoints" / "best.json").read_text())["step"] in (2, 4, 6)

    cli(["fit", *args(feats, tmp_path / "example", "--trainer.max_steps=8", "--ckpt_path=last",
                      "--trainer.enable_progress_bar=false")])
    assert last(tmp_path / "example")["global_step"] == 8
    loop.main(args(feats, tmp_path / "example", "--trainer.max_steps=10", "--ckpt_path=last"))
    chained = last(tmp_path / "example")
    assert chained["global_step"] == 10
    # The same legs (max_steps 6, 8, 10: each sets its own LR schedule) by the fabric command alone.
    for steps in (8, 10):
        cli(["fabric", *args(feats, tmp_path / "fabric", f"--trainer.max_steps={steps}", "--ckpt_path=last")])
    assert same_weights(chained["state_dict"], last(tmp_path / "fabric")["state_dict"])
