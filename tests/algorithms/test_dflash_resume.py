"""DFlash resumes exactly through the CLI: interrupted + ``--ckpt_path last`` ends with the straight run's weights.

Anchors are seeded by (anchor_seed, step, sample id) and the loader restores its
position, so the resumed steps draw the same anchors on the same samples.
"""

from __future__ import annotations

import torch

from tests.algorithms.cli_runs import assert_resume_matches_straight, feature_data, write_resume_config
from tests.integration.scripts.common import make_features

MODEL = {"class_path": "specforge_lightning.algorithms.dflash.DFlashModule",
         "init_args": {"block_size": 4, "num_anchors": 6, "lr": 1e-2, "warmup_ratio": 0.2}}


def test_interrupted_and_resumed_fit_matches_the_straight_run(tmp_path):
    torch.set_num_threads(1)
    features = tmp_path / "features"
    make_features(features)
    data = feature_data(features)
    assert_resume_matches_straight(tmp_path, lambda root, at: write_resume_config(root, at, MODEL, data))
