"""Acceptance metrics: count-based reduction and the simulated acceptance length."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from specforge_lightning.algorithms.metrics import AcceptanceMetric, simulated_acceptance_length


def test_simulated_acceptance_length_formula():
    assert simulated_acceptance_length([]) == 1.0
    assert simulated_acceptance_length([0.0, 1.0]) == 1.0
    assert simulated_acceptance_length([1.0, 1.0, 1.0]) == 4.0
    assert simulated_acceptance_length([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert simulated_acceptance_length([0.8, 0.5, 0.25]) == pytest.approx(1 + 0.8 + 0.4 + 0.1)


def _random_counts(n: int, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        total = torch.randint(0, 50, (k,), generator=g)
        out.append((torch.minimum(torch.randint(0, 50, (k,), generator=g), total), total))
    return out


def test_compute_is_pooled_counts_whatever_the_split():
    counts = _random_counts(12, 4, seed=0)
    correct = sum(c for c, _ in counts)
    total = sum(t for _, t in counts)
    expected = (correct.double() / total.double()).tolist()

    whole = AcceptanceMetric(4)
    for c, t in counts:
        whole.update(c, t)
    # Two "ranks" with uneven shares, merged as a sum-reduce would.
    a, b = AcceptanceMetric(4), AcceptanceMetric(4)
    for i, (c, t) in enumerate(counts):
        (a if i % 3 == 0 else b).update(c, t)
    a.merge_state(b)
    for metric in (whole, a):
        out = metric.compute()
        torch.testing.assert_close(out["acc_k"], torch.tensor(expected, dtype=torch.float64))
        assert out["acceptance_length"].item() == pytest.approx(simulated_acceptance_length(expected))
        assert out["acc"].item() == pytest.approx(correct.sum().item() / total.sum().item())
    # A mean of per-batch ratios would differ: the metric must not be that.
    batch_means = torch.stack([c.double() / t.clamp_min(1).double() for c, t in counts]).mean(0)
    assert not torch.allclose(batch_means, torch.tensor(expected, dtype=torch.float64))


def test_forward_returns_the_step_value_and_accumulates():
    m = AcceptanceMetric(2, dist_sync_on_step=True)
    step = m(torch.tensor([3, 1]), torch.tensor([4, 4]))
    assert step["acc_k"].tolist() == [0.75, 0.25]
    m(torch.tensor([1, 1]), torch.tensor([4, 4]))
    assert m.compute()["acc_k"].tolist() == [0.5, 0.25]
    with pytest.raises(ValueError):
        m.update(torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1]))


def test_empty_denominator_is_zero_accuracy():
    m = AcceptanceMetric(3)
    m.update(torch.tensor([2, 0, 0]), torch.tensor([2, 0, 0]))
    out = m.compute()
    assert out["acc_k"].tolist() == [1.0, 0.0, 0.0] and out["acceptance_length"].item() == 2.0


def _rank_main(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = AcceptanceMetric(2)
        if rank == 0:  # rank 0: 9/10 and 1/10; rank 1: 1/30 and 0/30 -> pooled 10/40, 1/40
            m.update(torch.tensor([9, 1]), torch.tensor([10, 10]))
        else:
            m.update(torch.tensor([1, 0]), torch.tensor([30, 30]))
        out = m.compute()
        assert out["acc_k"].tolist() == [0.25, 0.025], out
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_rank_gloo_reduction_is_count_based():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port), nprocs=2, join=True, start_method="spawn")
