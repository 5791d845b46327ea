"""A time budget that plans itself: how many conversations to capture and how long to train.

Why: a fixed recipe (1,024 conversations, 15.5 minutes of fit) fits 30 minutes on the machine
it was tuned on and overruns or wastes time everywhere else. The planner takes this machine's
measured speeds (``Throughputs``) and sizes the two elastic stages, capture and fit, so that
install + prepare + fit + evaluate + export fit the budget. This module is the arithmetic
and its formatting only; measuring is the caller's job.

The split, in order (every step is one line of ``plan_budget``):

1. Fixed costs come off first: install (already spent), measuring, regenerating and capturing
   the validation set, evaluation, export, each command's start-up, and a safety margin
   (``margin_fraction`` of the budget). What is left, ``V``, is shared by capture and fit.
2. Data repeat rule: the fit should not pass over the captured set more than ``max_epochs``
   times. With ``c`` seconds to capture one conversation, ``s`` seconds per step and ``b``
   conversations per step, a fit of ``F`` seconds reads ``F*b/s`` conversations, so
   ``N = F*b/(s*max_epochs)`` and ``V = N*c + F`` give ``F = V / (1 + b*c/(s*max_epochs))``.
   The default of 6 passes is what the quickstart recipe trains (3,095 steps x 2 over 1,024
   conversations) while validation AL still rose at every check.
3. The fit keeps at least ``fit_fraction`` of ``V`` (on a machine where capture is slow
   relative to training, more data would starve the training itself).
4. ``N`` is clamped to ``[min_samples, max_samples]`` and lowered if the fit would get less than
   ``min_fit_minutes``; the fit gets the rest of ``V``. A budget that cannot hold
   ``min_samples`` and ``min_fit_minutes`` is refused with a ValueError that names the minimum
   budget for this machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

STAGES = ("install", "measure", "regenerate", "capture", "fit", "evaluate", "export")
# Commands after install, each paying ``startup_s`` once (interpreter, imports, target load).
_COMMAND_STAGES = ("capture", "fit", "evaluate", "export")


@dataclass(frozen=True)
class Throughputs:
    """This machine's measured speeds (at the precision the run will use).

    ``eval_tokens_per_s`` is new tokens per second of the WHOLE evaluation (speculative and
    target-only decoding together), so ``prompts * new_tokens / eval_tokens_per_s`` is its time.
    ``install_s`` and ``measure_s`` are already spent when the plan is made; they still count.
    """

    capture_tokens_per_s: float
    regenerate_tokens_per_s: float
    train_step_s: float
    eval_tokens_per_s: float
    install_s: float = 0.0
    measure_s: float = 0.0
    export_s: float = 10.0
    startup_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            positive = f.name in ("capture_tokens_per_s", "regenerate_tokens_per_s", "train_step_s", "eval_tokens_per_s")
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                need = "a positive" if positive else "a non-negative"
                raise ValueError(f"Throughputs.{f.name} must be {need} finite number, got {value!r}")


@dataclass(frozen=True)
class BudgetPlan:
    """What the planner decided and what each stage is expected to take (seconds)."""

    budget_s: float
    num_samples: int
    num_val_samples: int
    fit_minutes: float
    max_steps: int  # expected steps in ``fit_minutes``; bound the fit by ``max_time``, not by this
    epochs: float  # expected passes over the captured train set
    eval_prompts: int
    eval_new_tokens: int
    stages: dict[str, float]
    margin_s: float
    limited_by: str  # the rule that set num_samples: max_epochs, fit_fraction, min_samples, max_samples, min_fit_minutes
    tokens_per_sample: float
    train_step_s: float

    @property
    def total_s(self) -> float:
        """Sum of the stage estimates (the margin is on top: ``total_s + margin_s <= budget_s``)."""
        return float(sum(self.stages.values()))

    @property
    def fit_s(self) -> float:
        return self.fit_minutes * 60.0

    def trainer_max_time(self) -> str:
        """``fit_minutes`` as Lightning's ``trainer.max_time`` string, ``DD:HH:MM:SS``."""
        whole = int(self.fit_s)
        return f"00:{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def plan_budget(
    budget_minutes: float,
    throughputs: Throughputs,
    *,
    tokens_per_sample: float,
    min_samples: int = 64,
    max_samples: int | None = None,
    num_val_samples: int = 32,
    regenerate_val: bool = True,
    regenerate_fraction: float = 0.0,
    regenerate_new_tokens: int = 128,
    batch_size: int = 2,
    max_epochs: float = 6.0,
    fit_fraction: float = 0.6,
    min_fit_minutes: float = 2.0,
    eval_prompts: int = 20,
    eval_new_tokens: int = 128,
    margin_fraction: float = 0.1,
) -> BudgetPlan:
    """Size capture (``num_samples``) and fit (``fit_minutes``) to fit ``budget_minutes``.

    ``tokens_per_sample``: mean tokens of one captured conversation. ``regenerate_fraction``:
    the share of train conversations re-answered by the target (``regenerate_samples``), each
    costing ``regenerate_new_tokens`` generated tokens; validation answers are regenerated when
    ``regenerate_val``. See the module docstring for the rule; raises ValueError naming the
    smallest budget that fits ``min_samples`` and ``min_fit_minutes`` on this machine.
    """
    t = throughputs
    _check_args(budget_minutes, tokens_per_sample, min_samples, max_samples, batch_size, max_epochs,
                fit_fraction, min_fit_minutes, margin_fraction, regenerate_fraction)
    budget_s = budget_minutes * 60.0
    regen_per_reply = regenerate_new_tokens / t.regenerate_tokens_per_s
    capture_per_sample = tokens_per_sample / t.capture_tokens_per_s
    per_sample = capture_per_sample + regenerate_fraction * regen_per_reply  # ``c`` in the docstring
    val_regen = num_val_samples * regen_per_reply if regenerate_val else 0.0
    fixed = {
        "install": t.install_s,
        "measure": t.measure_s,
        "regenerate": val_regen,
        "capture": num_val_samples * capture_per_sample + t.startup_s,
        "fit": t.startup_s,
        "evaluate": eval_prompts * eval_new_tokens / t.eval_tokens_per_s + t.startup_s,
        "export": t.export_s + t.startup_s,
    }
    margin_s = margin_fraction * budget_s
    min_fit_s = min_fit_minutes * 60.0
    variable = budget_s - margin_s - sum(fixed.values())  # ``V``: capture of train data + fit
    need = min_samples * per_sample + min_fit_s
    if variable < need:
        minimum = (sum(fixed.values()) + need) / (1.0 - margin_fraction)
        raise ValueError(
            f"a {budget_minutes:g}-minute budget is too small on this machine: {min_samples} conversations "
            f"and {min_fit_minutes:g} minutes of fit need at least {math.ceil(minimum / 60.0)} minutes "
            f"(fixed costs {sum(fixed.values()) / 60.0:.1f} min + capture {min_samples * per_sample / 60.0:.1f} min "
            f"+ fit {min_fit_minutes:g} min + {margin_fraction:.0%} margin); set --budget_minutes "
            f"{math.ceil(minimum / 60.0)} or more, or switch the planner off"
        )
    fit_s = variable / (1.0 + batch_size * per_sample / (t.train_step_s * max_epochs))  # rule 2
    limited_by = "max_epochs"
    if fit_s < fit_fraction * variable:  # rule 3
        fit_s, limited_by = fit_fraction * variable, "fit_fraction"
    num_samples = int((variable - fit_s) / per_sample)
    if num_samples < min_samples:  # rule 4
        num_samples, limited_by = min_samples, "min_samples"
    elif max_samples is not None and num_samples > max_samples:
        num_samples, limited_by = max_samples, "max_samples"
    if variable - num_samples * per_sample < min_fit_s:  # the fit's minimum wins over more data
        num_samples, limited_by = int((variable - min_fit_s) / per_sample), "min_fit_minutes"
    fit_s = math.floor(variable - num_samples * per_sample)  # the fit takes whatever capture leaves
    stages = dict(fixed)
    stages["regenerate"] += num_samples * regenerate_fraction * regen_per_reply
    stages["capture"] += num_samples * capture_per_sample
    stages["fit"] += fit_s
    steps = int(fit_s / t.train_step_s)
    return BudgetPlan(
        budget_s=budget_s,
        num_samples=num_samples,
        num_val_samples=num_val_samples,
        fit_minutes=fit_s / 60.0,
        max_steps=steps,
        epochs=steps * batch_size / num_samples if num_samples else 0.0,
        eval_prompts=eval_prompts,
        eval_new_tokens=eval_new_tokens,
        stages=stages,
        margin_s=margin_s,
        limited_by=limited_by,
        tokens_per_sample=tokens_per_sample,
        train_step_s=t.train_step_s,
    )


def _check_args(budget_minutes, tokens_per_sample, min_samples, max_samples, batch_size, max_epochs,
                fit_fraction, min_fit_minutes, margin_fraction, regenerate_fraction) -> None:
    """Refuse nonsense early, naming the argument (a plan built on it would mislead)."""
    checks = [
        ("budget_minutes", budget_minutes > 0),
        ("tokens_per_sample", tokens_per_sample > 0),
        ("min_samples", min_samples >= 1),
        ("max_samples", max_samples is None or max_samples >= min_samples),
        ("batch_size", batch_size >= 1),
        ("max_epochs", max_epochs > 0),
        ("fit_fraction", 0.0 <= fit_fraction < 1.0),
        ("min_fit_minutes", min_fit_minutes >= 0),
        ("margin_fraction", 0.0 <= margin_fraction < 1.0),
        ("regenerate_fraction", 0.0 <= regenerate_fraction <= 1.0),
    ]
    for name, ok in checks:
        if not ok:
            raise ValueError(f"plan_budget: {name} is out of range (see plan_budget's docstring)")


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60.0:.1f} min"


def _stage_note(plan: BudgetPlan, stage: str) -> str:
    if stage == "capture":
        return (f"{plan.num_samples:,} train + {plan.num_val_samples:,} val conversations"
                f" (~{plan.tokens_per_sample:.0f} tokens each)")
    if stage == "fit":
        return f"~{plan.max_steps:,} steps of {plan.train_step_s:.2f} s, ~{plan.epochs:.1f} passes over the data"
    if stage == "evaluate":
        return f"{plan.eval_prompts} prompts x {plan.eval_new_tokens} new tokens"
    return ""


def format_plan(plan: BudgetPlan) -> str:
    """The plan as printed at start: one line per stage, then the total against the budget."""
    lines = [f"time budget {plan.budget_s / 60.0:.1f} min (margin {plan.margin_s / 60.0:.1f} min); plan:"]
    for stage in STAGES:
        note = _stage_note(plan, stage)
        lines.append(f"  {stage:<10} {_minutes(plan.stages[stage]):>9}" + (f"  {note}" if note else ""))
    lines.append(f"  {'total':<10} {_minutes(plan.total_s):>9}  of {plan.budget_s / 60.0:.1f} min"
                 f" (conversations set by {plan.limited_by})")
    return "\n".join(lines)


def format_plan_vs_actual(plan: BudgetPlan, actual: Mapping[str, float]) -> str:
    """The plan beside what happened, printed at the end.

    ``actual`` maps stage names to seconds taken, plus optionally ``num_samples`` (conversations
    captured) and ``steps`` (fit steps done). Stages missing from it show ``-`` and do not count
    toward the actual total; other keys are listed as they are.
    """
    known = set(STAGES) | {"num_samples", "steps"}
    lines = [f"time budget {plan.budget_s / 60.0:.1f} min: plan vs actual",
             f"  {'stage':<10} {'plan':>9} {'actual':>9}"]
    for stage in STAGES:
        got = actual.get(stage)
        lines.append(f"  {stage:<10} {_minutes(plan.stages[stage]):>9} {_minutes(got):>9}")
    spent = sum(float(actual[s]) for s in STAGES if s in actual)
    missing = [s for s in STAGES if s not in actual]
    left = plan.budget_s - spent
    verdict = f"within budget, {left / 60.0:.1f} min to spare" if left >= 0 else f"OVER budget by {-left / 60.0:.1f} min"
    if missing:
        verdict += f"; not measured: {', '.join(missing)}"
    lines.append(f"  {'total':<10} {_minutes(plan.total_s):>9} {_minutes(spent):>9}  ({verdict})")
    if "num_samples" in actual:
        lines.append(f"  conversations: {plan.num_samples:,} planned, {int(actual['num_samples']):,} captured")
    if "steps" in actual:
        lines.append(f"  fit steps: ~{plan.max_steps:,} planned, {int(actual['steps']):,} done")
    for key in sorted(set(actual) - known):
        lines.append(f"  {key}: {actual[key]}")
    return "\n".join(lines)
