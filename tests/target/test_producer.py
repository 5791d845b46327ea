"""The producer CLI reads a fit config."""

from __future__ import annotations

from tests.data.stream_fakes import REPO


def test_produce_cli_reads_the_fit_config():
    from specforge_lightning.target.producer import parse_args

    cfg = parse_args(["--config", str(REPO / "configs/eagle3-tiny-stream.yaml"), "--prepare.num_samples=6",
                      "--store.root=/tmp/elsewhere"])
    assert cfg.prepare.target == "tiny-llama" and cfg.prepare.num_samples == 6 and cfg.prepare.shard_size == 16
    assert cfg.store.kind == "shared_dir" and cfg.store.root == "/tmp/elsewhere" and cfg.epochs == 2
    assert cfg.ledger.endswith("ledger.sqlite") and (cfg.high_watermark, cfg.low_watermark) == (16, 8)
