"""The forward hook our SGLang capture servers load (``--forward-hooks``): features out through a FeatureStore.

It runs INSIDE SGLang's scheduler process, in SGLang's venv, so it imports only torch,
safetensors (through the store modules) and our store modules: nothing that pulls
transformers, lightning or the rest of the package. ``sglang_engine.py`` writes the hook
spec; :func:`hook_spec` is the one place its shape is decided, so the engine's check of a
running server compares against the very same dict.

The hook sits on the model's ``logits_processor``, whose forward receives
``(input_ids, hidden_states, lm_head, forward_batch, aux_hidden_states)``: the post-norm
final states of every extend token, and the outputs of the chosen decoder layers as
SGLang's own aux capture (``--enable-return-aux-hidden-states``) stores them, i.e. the
input of layer ``i + 1`` = the output of layer ``i`` (our convention). For each request
whose id starts with ``rid_prefix`` it puts one sample, keyed by the request id:
``input_ids`` (L,) int64, ``aux_hidden_states`` (L, k*H), ``last_hidden_state`` (L, H) and,
with ``top1``, ``target_top1`` (L,) int64 = the argmax of the target's logits at every
position (the engine masks it). Other traffic (warm-up, health checks) is ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from specforge_lightning.data.stores.spec import StoreSpec, build_store

log = logging.getLogger(__name__)

HOOK_NAME = "specforge_capture"
HOOK_FACTORY = "specforge_lightning.target.sglang_hook:capture_hook"
HOOK_TARGET = "logits_processor"
RID_PREFIX = "sfl-"


def hook_spec(
    layer_ids: Sequence[int],
    store: Mapping[str, Any],
    *,
    capture_dtype: str,
    vocab_size: int,
    top1: bool = True,
) -> dict[str, Any]:
    """One ``--forward-hooks`` entry; ``layer_ids`` sorted and unique (SGLang captures in that order)."""
    return {
        "name": HOOK_NAME,
        "target_modules": [HOOK_TARGET],
        "hook_factory": HOOK_FACTORY,
        "config": {
            "layer_ids": sorted(set(int(i) for i in layer_ids)),
            "store": dict(store),
            "capture_dtype": capture_dtype,
            "vocab_size": int(vocab_size),
            "top1": bool(top1),
            "rid_prefix": RID_PREFIX,
        },
    }


class CaptureHook:
    """Writes each of our prefill requests' features into the store named by ``config['store']``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.layer_ids = list(config["layer_ids"])
        self.dtype = getattr(torch, config["capture_dtype"])
        self.vocab_size = int(config["vocab_size"])
        self.top1 = bool(config.get("top1", True))
        self.prefix = str(config.get("rid_prefix", RID_PREFIX))
        # The server owns what it writes until the engine reads it: not consume-once here.
        self.store = build_store(StoreSpec(**config["store"]), consume_once=False, producer=True)

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        batch = args[3] if len(args) > 3 else None
        rids = list(getattr(batch, "rids", None) or [])
        if not any(isinstance(r, str) and r.startswith(self.prefix) for r in rids):
            return None
        try:
            self._write(args, batch, rids)
        except Exception:  # never take the server down: the engine reports the missing sample
            log.exception("specforge capture hook failed for requests %s", rids)
        return None

    def _write(self, args: tuple, batch: Any, rids: list[str]) -> None:
        mode = batch.forward_mode
        if not mode.is_extend():
            return
        input_ids, hidden, lm_head = args[0], args[1], args[2]
        aux = args[4] if len(args) > 4 else None
        if aux is None:
            raise RuntimeError("no aux hidden states: start the server with --enable-return-aux-hidden-states")
        aux = aux if isinstance(aux, torch.Tensor) else torch.cat(list(aux), dim=-1)
        lens = list(batch.extend_seq_lens_cpu)
        prefixes = list(batch.extend_prefix_lens_cpu or [0] * len(lens))
        top1 = self._greedy(hidden, lm_head) if self.top1 else None
        start = 0
        for rid, n, cached in zip(rids, lens, prefixes):
            lo, start = start, start + n
            if not (isinstance(rid, str) and rid.startswith(self.prefix)):
                continue
            if cached:
                raise RuntimeError(
                    f"request {rid} reused {cached} cached tokens: the capture server needs --disable-radix-cache "
                    "and --chunked-prefill-size -1 (one whole prefill per request)"
                )
            sample = {
                "input_ids": input_ids[lo : lo + n].to("cpu", torch.long),
                "aux_hidden_states": aux[lo : lo + n].to(self.dtype).cpu().contiguous(),
                "last_hidden_state": hidden[lo : lo + n].to(self.dtype).cpu().contiguous(),
            }
            if top1 is not None:
                sample["target_top1"] = top1[lo : lo + n].cpu()
            self.store.put(sample, rid)

    def _greedy(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        """Argmax of the logits at every token, in chunks, widened to fp32 (as HFTargetEngine does)."""
        weight = lm_head.weight[: self.vocab_size]
        chunks = [torch.nn.functional.linear(c, weight).float().argmax(-1) for c in hidden.split(1024)]
        return torch.cat(chunks) if chunks else hidden.new_zeros((0,), dtype=torch.long)


def capture_hook(config: Mapping[str, Any]) -> CaptureHook:
    """The ``hook_factory`` SGLang calls once per model at start-up."""
    return CaptureHook(config)
