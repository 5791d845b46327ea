"""``python -m specforge_lightning plan``: size a run's capture and fit to a time budget, on this machine.

    python -m specforge_lightning plan --config configs/eagle3.yaml --budget_minutes 30 --out runs/x/plan.json

Why: a fixed recipe fits its budget only on the machine it was tuned on. This command measures
the machine in ~20 s (``measure_machine``: capture tokens/s over ``--conversations`` corpus
conversations at the precision ``auto`` picks, batched greedy regeneration, one short greedy
decode at the evaluation dtype), hands the speeds to ``runtime.budget.plan_budget`` (all the
arithmetic lives there), prints ``format_plan``, writes the plan as JSON and prints the fit
overrides on its last line. ``--budget_minutes 0`` switches the planner off (no overrides).

The training step is not run here (a fit needs prepared features and ~10 s of start-up): it is
estimated from the capture speed (``estimate_train_step_s``) unless ``--train_step_s`` gives it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from specforge_lightning.config_files import check_fields, load_yaml, section
from specforge_lightning.errors import UserError
from specforge_lightning.files import write_json_atomic
from specforge_lightning.runtime.budget import BudgetPlan, Throughputs, format_plan, plan_budget

# A step of the EAGLE3 recipe over a batch of T tokens takes as long as capturing STEP_CAPTURE_RATIO * T
# tokens: docs/performance.md's 2-core figures, 0.284 s per step (batch 2 x ~296 tokens) against
# ~0.33 s per captured conversation (~900 tokens/s). It carries to other machines as far as both are
# matmul-bound at the same precision; pass --train_step_s for another algorithm or a measured value.
STEP_CAPTURE_RATIO = 0.43
# The whole evaluation (target-only and speculative decoding of every prompt, one teacher-forced
# pass) took 241 s for 20 x 128 new tokens at 46 ms per greedy token (docs/performance.md): the time
# of ~2 greedy decodes.
EVAL_DECODES = 2.0
# Interpreter and imports of one command before its work starts (the target load is measured).
IMPORT_S = 6.0
# Conversations per shard-sized step of the sample grid: a rerun that plans nearly the same
# number reuses the same prepared folder (the count is part of the features' identity).
SAMPLE_GRID = 64


@dataclass(frozen=True)
class Measured:
    """What ``measure_machine`` found (speeds at the precision the run will use)."""

    capture_tokens_per_s: float
    regenerate_tokens_per_s: float
    greedy_tokens_per_s: float
    tokens_per_sample: float
    target_load_s: float
    precision: dict[str, str]


def measure_machine(prep: Any, *, conversations: int = 8, eval_dtype: str = "float32") -> Measured:
    """Time capture, regeneration and greedy decoding of the config's target on a few conversations.

    ``prep``: the run's PrepareConfig (dtypes may say ``auto``). Every measurement is preceded by
    an untimed warm-up (first calls allocate and pick kernels).
    """
    import torch

    from specforge_lightning.evaluation.decode_linear import use_decode_linears
    from specforge_lightning.evaluation.speculative import TargetRunner, greedy_generate
    from specforge_lightning.target.engine import HFTargetEngine
    from specforge_lightning.target.identity import load_tokenizer
    from specforge_lightning.target.layers import planned_layer_ids
    from specforge_lightning.target.prepare import build_tasks
    from specforge_lightning.target.regenerate import greedy_responses
    from specforge_lightning.target.zoo import load_target, resolve_target

    cfg = prep.resolved()
    target_dir = resolve_target(cfg.target, cfg.cache_dir)
    tokenizer = load_tokenizer(target_dir)
    sample = replace(cfg, num_samples=max(64, conversations + 2), num_val_samples=0, regenerate=False,
                     regenerate_samples=None, skip_samples=cfg.skip_samples)
    tasks = build_tasks(sample, tokenizer).train
    t0 = time.perf_counter()
    engine = HFTargetEngine.from_path(str(target_dir), dtype=getattr(torch, cfg.compute_dtype),
                                      capture_dtype=getattr(torch, cfg.capture_dtype))
    load_s = time.perf_counter() - t0
    layers = planned_layer_ids(engine.num_layers, cfg.layer_preset or "eagle3", cfg.layer_ids, None)
    engine.capture(tasks[:2], layers)
    timed = tasks[2 : 2 + conversations]
    t0 = time.perf_counter()
    for start in range(0, len(timed), cfg.batch_size):
        engine.capture(timed[start : start + cfg.batch_size], layers)
    capture = sum(t.num_tokens for t in timed) / (time.perf_counter() - t0)

    prompts = [list(t.input_ids[: min(64, t.num_tokens)]) for t in timed]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad
    greedy_responses(engine.model, prompts[:2], max_new_tokens=2, eos_id=eos, pad_id=pad, batch_size=2, progress=False)
    t0 = time.perf_counter()
    answers = greedy_responses(engine.model, prompts, max_new_tokens=16, eos_id=eos, pad_id=pad,
                               batch_size=len(prompts), progress=False)
    regenerate = sum(len(a) for a in answers) / (time.perf_counter() - t0)
    del engine

    model, _ = load_target(target_dir, dtype=getattr(torch, eval_dtype))
    if next(model.parameters()).device.type == "cpu":
        use_decode_linears(model)  # as evaluate does on CPU
    runner = TargetRunner(model)
    greedy_generate(runner, prompts[0], 4, set())
    rates = []
    for _ in range(2):  # the faster of two: a shared machine's other load is not this run's speed
        t0 = time.perf_counter()
        new = greedy_generate(runner, prompts[0], 16, set())
        rates.append(len(new) / (time.perf_counter() - t0))
    greedy = max(rates)
    mean_tokens = sum(t.num_tokens for t in tasks) / len(tasks)
    dtypes = {"compute_dtype": cfg.compute_dtype, "capture_dtype": cfg.capture_dtype, "eval_dtype": eval_dtype}
    return Measured(capture, regenerate, greedy, mean_tokens, load_s, dtypes)


def estimate_train_step_s(measured: Measured, batch_size: int) -> float:
    """Seconds per training step from the capture speed (see ``STEP_CAPTURE_RATIO``)."""
    return STEP_CAPTURE_RATIO * batch_size * measured.tokens_per_sample / measured.capture_tokens_per_s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specforge_lightning plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the fit config (data.init_args.prepare, data batch_size)")
    p.add_argument("--budget_minutes", type=float, default=30.0, help="the whole run's budget; 0 switches the planner off")
    p.add_argument("--out", required=True, help="where to write the plan JSON")
    p.add_argument("--install_s", type=float, default=0.0, help="seconds the install already took (counted in the budget)")
    p.add_argument("--conversations", type=int, default=8, help="conversations the capture speed is measured on")
    p.add_argument("--eval_prompts", type=int, default=20)
    p.add_argument("--eval_new_tokens", type=int, default=128)
    p.add_argument("--eval_dtype", default="float32", choices=["float32", "bfloat16"], help="evaluate's --dtype")
    p.add_argument("--train_step_s", type=float, default=None,
                   help="seconds per training step, measured elsewhere (default: estimated from the capture speed)")
    p.add_argument("--max_samples", type=int, default=None, help="never plan more train conversations than this")
    return p


def _read_config(path: str) -> tuple[Any, int]:
    """(PrepareConfig, data batch size) of a fit config; unknown prepare keys are named."""
    from dataclasses import fields

    from specforge_lightning.target.prepare_config import PrepareConfig

    config = load_yaml(path)
    prep = section(config, "data.prepare", source=path, required=True)
    check_fields(prep, [f.name for f in fields(PrepareConfig)], where=f"data.prepare of {path}")
    data = section(config, "data", source=path, required=True)
    return PrepareConfig(**prep), int(data.get("batch_size", 1))


def _on_grid(num: int, least: int) -> int:
    return max(least, num // SAMPLE_GRID * SAMPLE_GRID)


def overrides_for(plan: BudgetPlan, prep: Any) -> list[str]:
    """The fit flags that apply ``plan``; the features go to a folder named by their count."""
    return [
        f"--data.init_args.prepare.num_samples={plan.num_samples}",
        f"--data.init_args.prepare.output_dir={prep.output_dir}-n{plan.num_samples}",
        f"--trainer.max_time={plan.trainer_max_time()}",
    ]


def make_plan(ns: argparse.Namespace, prep: Any, batch_size: int, measured: Measured, measure_s: float) -> BudgetPlan:
    """``plan_budget`` on the measured speeds, then once more with the count on ``SAMPLE_GRID``."""
    step_s = ns.train_step_s or estimate_train_step_s(measured, batch_size)
    speeds = Throughputs(
        capture_tokens_per_s=measured.capture_tokens_per_s,
        regenerate_tokens_per_s=measured.regenerate_tokens_per_s,
        train_step_s=step_s,
        eval_tokens_per_s=measured.greedy_tokens_per_s / EVAL_DECODES,
        install_s=ns.install_s,
        measure_s=measure_s,
        startup_s=IMPORT_S + measured.target_load_s,
    )
    regen_fraction = 0.0
    if prep.regenerate:
        regen_fraction = 1.0 if prep.regenerate_samples is None else prep.regenerate_samples / prep.num_samples
    options = dict(
        tokens_per_sample=measured.tokens_per_sample, num_val_samples=prep.num_val_samples,
        regenerate_val=prep.regenerate, regenerate_fraction=regen_fraction,
        regenerate_new_tokens=prep.regenerate_max_new_tokens, batch_size=batch_size,
        eval_prompts=ns.eval_prompts, eval_new_tokens=ns.eval_new_tokens, max_samples=ns.max_samples,
    )
    plan = plan_budget(ns.budget_minutes, speeds, **options)
    grid = _on_grid(plan.num_samples, 64)
    if grid < plan.num_samples:
        plan = plan_budget(ns.budget_minutes, speeds, **{**options, "max_samples": grid})
    return plan


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    ns = build_parser().parse_args(None if args is None else list(args))
    started = time.perf_counter()
    if ns.budget_minutes < 0:
        raise UserError(f"plan: --budget_minutes {ns.budget_minutes:g}: give the minutes of the whole run, or 0 for no plan")
    prep, batch_size = _read_config(ns.config)
    result: dict[str, Any] = {"config": ns.config, "budget_minutes": ns.budget_minutes, "enabled": ns.budget_minutes > 0}
    if not result["enabled"]:
        print("time budget planner off (--budget_minutes 0): the recipe's own num_samples and max_time")
        result["overrides"] = []
    else:
        import torch

        measured = measure_machine(prep, conversations=ns.conversations, eval_dtype=ns.eval_dtype)
        print(f"measured: capture {measured.capture_tokens_per_s:.0f} tokens/s, regenerate "
              f"{measured.regenerate_tokens_per_s:.0f} tokens/s, greedy decode {measured.greedy_tokens_per_s:.1f} "
              f"tokens/s ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
              f"{measured.precision['compute_dtype']})")
        try:
            plan = make_plan(ns, prep, batch_size, measured, time.perf_counter() - started)
        except ValueError as e:
            raise UserError(f"plan: {e}") from None
        print(format_plan(plan))
        result.update(measured=asdict(measured), plan={**asdict(plan), "total_s": plan.total_s},
                      cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                      overrides=overrides_for(plan, prep))
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ns.out, result)
    print("fit overrides: " + (" ".join(result["overrides"]) or "(none)"), flush=True)
    return result


def plan_from_json(path: str | Path) -> BudgetPlan | None:
    """The BudgetPlan a ``plan`` run wrote (None when the planner was off), for the end-of-run report."""
    data = json.loads(Path(path).read_text())
    if not data.get("enabled"):
        return None
    fields = {k: v for k, v in data["plan"].items() if k != "total_s"}
    return BudgetPlan(**fields)


def _train_loop(run: Path) -> tuple[float | None, int | None]:
    """(seconds in the train loop, global step) from ``run``'s last checkpoint (Lightning's Timer state)."""
    import torch

    try:
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    except Exception:  # no checkpoint or an unreadable one: the report says "-" for it
        return None, None
    timer = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("Timer")), {})
    train = (timer.get("time_elapsed") or {}).get("train")
    return (float(train) if train is not None else None), ckpt.get("global_step")


def actual_stages(run: str | Path, *, install_s: float, measure_s: float, fit_s: float, evaluate_s: float,
                  export_s: float) -> dict[str, float]:
    """What each stage took, for ``format_plan_vs_actual``; the fit command's time is split three ways.

    Capture = the captured tokens at the manifest's ``capture_tokens_per_s``; fit = the train loop
    (the checkpoint's Timer); regenerate = the rest of the fit command (with its start-up).
    """
    from specforge_lightning.data.manifest import read_manifest

    run = Path(run)
    actual = {"install": install_s, "measure": measure_s, "evaluate": evaluate_s, "export": export_s}
    config = load_yaml(run / "config.yaml") if (run / "config.yaml").exists() else {}
    prep = section(config, "data.prepare", source=str(run / "config.yaml")) if config else {}
    manifest = read_manifest(prep["output_dir"]) if prep.get("output_dir") else None
    capture = 0.0
    if manifest and manifest.get("capture_tokens_per_s"):
        splits = manifest.get("splits", {})
        tokens = sum(s.get("num_tokens", 0) for s in splits.values())
        capture = tokens / float(manifest["capture_tokens_per_s"])
        actual["num_samples"] = splits.get("train", {}).get("num_samples", 0)
    train, steps = _train_loop(run)
    actual["capture"] = capture
    actual["fit"] = train if train is not None else max(0.0, fit_s - capture)
    actual["regenerate"] = max(0.0, fit_s - capture - actual["fit"])
    if steps is not None:
        actual["steps"] = steps
    return actual
