"""Fixtures and builders the drafting tests share: one thread, the tiny target, drafts built under a seed.

Import the fixtures by name (``from tests.algorithms.draft_fixtures import one_thread, target``); each test
module then gets its own module-scoped target, as when it defined the fixture itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch

from tests.evaluation.test_speculative import tiny_target

D = TypeVar("D", bound=torch.nn.Module)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def seeded(cls: Callable[[Any], D], config: Any, seed: int) -> D:
    """``cls(config)`` initialised under ``seed``, leaving the caller's random stream as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(config)


def with_target_head(draft: D, target: Any) -> D:
    """A block draft given copies of the target's embedding and LM head, in eval mode."""
    draft.set_target_weights(target.model.embed_tokens.weight.detach().clone(), target.lm_head.weight.detach().clone())
    return draft.eval()
