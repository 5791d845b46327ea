"""Pieces shared by the draft algorithms: Llama-style blocks, target-weight loading, the LR schedule.

Everything here mirrors the Llama conventions of Hugging Face ``transformers``
(RMSNorm in fp32, ``rotate_half`` RoPE, SwiGLU), so that a draft layer can be
initialised from, and served next to, a Llama/Qwen target.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from specforge_lightning.contracts import FeatureContext

# --------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, normalised in fp32 and cast back (as HF Llama does)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with the Llama parameter names."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) for RoPE types ``default``, ``linear`` and ``llama3``.

    ``dynamic`` NTK equals ``default`` inside the original context, which is where
    drafts are trained; ``yarn`` and others are refused rather than silently wrong.
    """
    # fp32 arithmetic on purpose: the same numbers transformers and SGLang compute.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("default", "dynamic"):
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    else:
        raise NotImplementedError(f"RoPE type {kind!r} is not supported (default, linear, llama3)")
    return inv_freq


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos/sin tables (B, T, head_dim) for integer positions (B, T), computed in fp32."""
    freqs = position_ids.float()[..., None] * inv_freq.float().to(position_ids.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., T, d); cos/sin must already broadcast against it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- target weights


def target_geometry(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The layer geometry a draft copies from a HF ``config.json``.

    Reads Transformers 4 ``rope_theta``/``rope_scaling`` and Transformers 5 ``rope_parameters``.
    """
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope:
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    else:
        scaling = cfg.get("rope_scaling")
    heads = int(cfg["num_attention_heads"])
    return {
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": dict(scaling) if scaling else None,
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_act": str(cfg.get("hidden_act", "silu")),
    }


class DraftConfigDict:
    """``to_dict``/``from_dict`` for draft-config dataclasses: the checkpoint and export form.

    Tuples become lists (JSON); ``from_dict`` ignores keys the class does not have.
    """

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def read_target_config(target_dir: str | Path) -> dict[str, Any]:
    """The target's ``config.json`` as a dict (multimodal ``text_config`` is merged on top)."""
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def _name_candidates(name: str) -> tuple[str, ...]:
    bare = name.removeprefix("model.")
    return (name, bare, "model." + bare, "model.language_model." + bare, "language_model.model." + bare)


def load_target_tensors(
    target_dir: str | Path, names: Iterable[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read only ``names`` from the target's (possibly sharded) safetensors files.

    Names are looked up with and without the ``model.`` prefix; a name that is
    not found is simply absent from the result (tied heads, for instance).
    """
    wanted = list(dict.fromkeys(names))
    found: dict[str, torch.Tensor] = {}
    files = sorted(Path(target_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in target folder {target_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for name in wanted:
                if name in found:
                    continue
                key = next((c for c in _name_candidates(name) if c in keys), None)
                if key is not None:
                    t = f.get_tensor(key)
                    found[name] = t if dtype is None else t.to(dtype)
    return found


def target_head_name(target_config: Mapping[str, Any]) -> str:
    """Where the target's output head lives: ``lm_head.weight``, or the embedding when tied."""
    return "model.embed_tokens.weight" if target_config.get("tie_word_embeddings", False) else "lm_head.weight"


def load_vocab_mapping(path: str | Path, vocab_size: int, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``d2t`` int64[Vd] and ``t2d`` bool[V] (``target_id = draft_id + d2t[draft_id]``).

    An empty path is allowed only when the draft vocabulary is the full target vocabulary.
    """
    if not path:
        if draft_vocab_size != vocab_size:
            raise ValueError("a vocab mapping file is required when draft_vocab_size != vocab_size")
        return torch.zeros(vocab_size, dtype=torch.long), torch.ones(vocab_size, dtype=torch.bool)
    tensors = load_file(str(path))
    d2t, t2d = tensors["d2t"].long(), tensors["t2d"].bool()
    if d2t.numel() != draft_vocab_size or t2d.numel() != vocab_size:
        raise ValueError(f"{path}: mapping sizes ({d2t.numel()}, {t2d.numel()}) != ({draft_vocab_size}, {vocab_size})")
    if not torch.equal(torch.nonzero(t2d).flatten(), d2t + torch.arange(draft_vocab_size)):
        raise ValueError(f"{path}: d2t and t2d disagree (nonzero(t2d) != d2t + arange)")
    return d2t, t2d


# --------------------------------------------------------------------------- optimisation


def warmup_cosine(
    step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0, min_progress: float = 0.0
) -> float:
    """LR multiplier: linear warmup ``(step+1)/warmup`` then cosine from 1 to ``min_lr_ratio``.

    ``warmup = int(warmup_ratio * total_steps)`` as upstream; the cosine spans the remaining steps.
    ``min_progress`` (0..1) moves the cosine at least that far along, e.g. the spent share of
    a time budget, so that a run cut by time still ends annealed.
    """
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(min_progress, (step - warmup) / max(1, total_steps - warmup)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_adamw_cosine(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    total_steps: int | float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_ratio: float = 0.015,
    min_lr_ratio: float = 0.0,
    time_progress: Callable[[], float] | None = None,
    fused: bool = False,
) -> dict[str, Any]:
    """AdamW plus a per-optimizer-step warmup/cosine schedule, in Lightning's return format.

    ``time_progress`` (spent share of a time budget, 0..1) makes the cosine follow the larger
    of the step and the time fractions: see ``time_budget_progress``. ``fused`` asks for the
    one-pass kernel (where every trainable tensor is on CPU or CUDA).
    """
    if not math.isfinite(total_steps) or total_steps <= 0:
        raise ValueError(
            f"the LR schedule needs a finite step horizon, got {total_steps}; set trainer.max_steps for streams"
        )
    total = int(total_steps)
    trainable = [p for p in params if p.requires_grad]
    fused = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, total, warmup_ratio, min_lr_ratio, time_progress() if time_progress is not None else 0.0
        ),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def time_budget_progress(trainer: L.Trainer) -> Callable[[], float]:
    """The share of ``trainer.max_time`` spent training so far, as a callable for the schedule.

    It reads Lightning's ``Timer``, whose elapsed time is saved in checkpoints, so a resumed
    run continues the same budget. Without ``max_time`` there is no budget to follow.
    """
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is None or timer.time_remaining() is None:
        raise ValueError("anneal_by_time needs a time budget: set trainer.max_time")

    def progress() -> float:
        elapsed = timer.time_elapsed()
        return min(1.0, elapsed / max(1e-9, elapsed + timer.time_remaining()))

    return progress


class LazyDraftModule(L.LightningModule):
    """A LightningModule whose draft is built from a ``FeatureContext`` when first needed.

    ``setup`` builds it from ``trainer.datamodule.feature_context``; a checkpoint
    stores the context and the draft config under ``checkpoint_key`` so that
    ``on_load_checkpoint`` rebuilds the architecture before Lightning loads the
    weights (``load_from_checkpoint`` needs no datamodule). Subclasses provide
    ``build(context)``, ``config_class`` and ``restore(context, config)``, and hparams
    ``lr``, ``weight_decay``, ``betas``, ``warmup_ratio``, ``min_lr_ratio`` for the
    optimizer (AdamW over the draft, warmup + cosine per optimizer step), and optionally
    ``anneal_by_time``: the cosine then also follows the spent share of ``trainer.max_time``
    (whichever of steps and time is further along), so that a time-capped run ends at the
    minimum LR on a slow machine and trains to the budget on a fast one (with ``max_steps``
    as a cap). The LR then depends on wall time: a resumed run is not bit-identical.
    """

    checkpoint_key: ClassVar[str]
    draft: nn.Module | None
    draft_config: Any
    context: FeatureContext | None

    def build(self, context: FeatureContext) -> None:
        raise NotImplementedError

    @staticmethod
    def config_class() -> type:
        raise NotImplementedError

    def restore(self, context: FeatureContext, config: Any) -> None:
        """Rebuild the draft of a checkpoint (no fresh initialisation: the weights follow)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.draft is not None:
            return
        context = getattr(getattr(self.trainer, "datamodule", None), "feature_context", None)
        if context is None:
            raise RuntimeError(f"{type(self).__name__} needs trainer.datamodule.feature_context (or build(context))")
        self.build(context)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.draft is None:
            raise RuntimeError(f"cannot checkpoint a {type(self).__name__} that was never built")
        checkpoint[self.checkpoint_key] = {
            "format": 1,
            "feature_context": self.context.to_dict(),
            "draft_config": self.draft_config.to_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint[self.checkpoint_key]
        config = self.config_class().from_dict(meta["draft_config"])
        if self.draft is None:
            self.restore(FeatureContext.from_dict(meta["feature_context"]), config)
        elif self.draft_config != config:
            raise ValueError(f"checkpoint draft config {config} differs from the built draft {self.draft_config}")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return build_adamw_cosine(
            self.draft.parameters(),
            lr=hp.lr,
            total_steps=self.trainer.estimated_stepping_batches,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            warmup_ratio=hp.warmup_ratio,
            min_lr_ratio=hp.min_lr_ratio,
            time_progress=time_budget_progress(self.trainer) if hp.get("anneal_by_time") else None,
            fused=self._fusable(),
        )

    def _fusable(self) -> bool:
        """One optimizer pass over all tensors: on CPU ~5 instead of ~27 ms per step for the
        quickstart's EAGLE3 draft. Only where ``configure_gradient_clipping`` may clip directly:
        whole (not sharded) parameters, and no fp16 loss scaler that must unscale first."""
        whole = isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))
        return whole and getattr(self.trainer.precision_plugin, "scaler", None) is None

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, on account of
        # fp16 loss scaling; without a scaler (bf16, fp32) the gradients are true values already.
        # So the check is skipped and the plugin's own clipping helpers are called directly.
        if not gradient_clip_val or not optimizer.defaults.get("fused"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        plugin = self.trainer.precision_plugin
        if gradient_clip_algorithm == "value":
            plugin.clip_grad_by_value(optimizer, gradient_clip_val)
        else:
            plugin.clip_grad_by_norm(optimizer, gradient_clip_val)
