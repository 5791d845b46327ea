"""One rank of a tiny FSDP run for the resume check: train, save a sharded checkpoint, resume, compare.

CPU (gloo): Lightning refuses ``strategy="fsdp"`` without a GPU and torch's FSDP refuses a CPU
module unless ``device_id`` is the CPU, so ``CPUFSDP`` passes it; on CUDA the real
``strategy="fsdp"`` runs. Writes ``{tag}_rank{r}.json`` (this rank's per-step losses) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

torch.set_num_threads(1)


class CPUFSDP(FSDPStrategy):
    """FSDP on CPU with gloo: what torch's FSDP runs when told the device is the CPU."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs
        )


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = (self.net(batch[0]) - batch[0].flip(-1)).pow(2).mean()
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)  # per-rank sharded moments


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--save_at_end", default="")
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--tag", default="run")
    a = p.parse_args()
    L.seed_everything(0, verbose=False)
    data = torch.utils.data.TensorDataset(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    strategy = CPUFSDP(process_group_backend="gloo", state_dict_type="sharded") if a.accelerator == "cpu" else "fsdp"
    trainer = L.Trainer(accelerator=a.accelerator, devices=int(os.environ.get("WORLD_SIZE", 1)), strategy=strategy,
                        max_steps=a.max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=a.out)
    module = Tiny()
    # DistributedSampler (per epoch, seeded): 16 samples / 2 ranks / batch 2 = 4 steps an epoch.
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2, shuffle=True), ckpt_path=a.ckpt_path)
    if a.save_at_end:
        trainer.save_checkpoint(a.save_at_end)
    Path(a.out, f"{a.tag}_rank{trainer.global_rank}.json").write_text(json.dumps({"losses": module.losses}))


if __name__ == "__main__":
    main()
