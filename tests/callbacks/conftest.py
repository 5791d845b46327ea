"""Fixtures for the callback tests: one tiny prepared-feature folder per session."""

import pytest
import torch

from tests.integration.scripts.common import make_features


@pytest.fixture(scope="session")
def features(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("features") / "tiny"
    make_features(root)
    return root
