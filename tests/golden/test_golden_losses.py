"""The per-step losses and final weights of fixed-seed fits, recorded before the algorithm seam moved code.

Bit for bit: a refactor that changes any arithmetic (order of a sum, a dtype, a seed draw) fails here.
Record again only for a change that means to alter training: ``python -m tests.golden.runner record``.
"""

from __future__ import annotations

import json

import pytest

from tests.golden.runner import CASES, GOLDEN, run_case_fresh


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_losses_and_weights_are_bit_identical_to_the_recording(name, tmp_path):
    expected = json.loads(GOLDEN.read_text())[name]
    got = run_case_fresh(name, tmp_path)
    assert len(got["losses"]) == len(expected["losses"]) > 0
    assert got["losses"] == expected["losses"]
    assert got["weights"] == expected["weights"]
