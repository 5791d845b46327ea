"""The time-budget planner's arithmetic with fake throughputs."""

import math

import pytest

from specforge_lightning.runtime.budget import (
    STAGES,
    BudgetPlan,
    Throughputs,
    format_plan,
    format_plan_vs_actual,
    plan_budget,
)

# Roughly the quickstart machine (2 cores): README and environment.md numbers.
QUICKSTART = Throughputs(capture_tokens_per_s=1850, regenerate_tokens_per_s=176, train_step_s=0.30,
                         eval_tokens_per_s=20 * 128 / 240, install_s=72, measure_s=10, startup_s=15)
TOKENS = 302.0


def fake(**kw) -> Throughputs:
    base = dict(capture_tokens_per_s=1850, regenerate_tokens_per_s=176, train_step_s=0.30,
                eval_tokens_per_s=10.0, install_s=60, measure_s=10, startup_s=10)
    base.update(kw)
    return Throughputs(**base)


def check_invariants(plan: BudgetPlan, min_samples: int = 64, min_fit_minutes: float = 2.0) -> None:
    assert set(plan.stages) == set(STAGES)
    assert plan.total_s + plan.margin_s <= plan.budget_s + 1e-6
    assert plan.num_samples >= min_samples
    assert plan.fit_minutes >= min_fit_minutes - 1e-9
    assert plan.max_steps == int(plan.fit_s / plan.train_step_s)


def test_quickstart_machine_plan_fits_30_minutes_and_looks_like_the_recipe():
    plan = plan_budget(30, QUICKSTART, tokens_per_sample=TOKENS)
    check_invariants(plan)
    assert plan.limited_by == "max_epochs"
    assert 800 <= plan.num_samples <= 1600  # the hand-tuned recipe captured 1,024
    assert 14 <= plan.fit_minutes <= 19  # and trained 15.5 minutes
    assert plan.epochs <= 6.0 + 1e-6
    assert plan.margin_s == pytest.approx(180.0)


@pytest.mark.parametrize("budget", [12, 20, 30, 60, 240])
@pytest.mark.parametrize("speed", [0.25, 1.0, 4.0])
def test_budget_is_respected_on_slow_and_fast_machines(budget, speed):
    t = fake(capture_tokens_per_s=1850 * speed, regenerate_tokens_per_s=176 * speed,
             train_step_s=0.30 / speed, eval_tokens_per_s=10.0 * speed)
    try:
        plan = plan_budget(budget, t, tokens_per_sample=TOKENS)
    except ValueError as e:
        assert "too small" in str(e)  # only a slow machine on a small budget may refuse
        assert speed < 1 and budget <= 20
        return
    check_invariants(plan)
    assert plan.total_s >= 0.85 * (plan.budget_s - plan.margin_s)  # the budget is used, not wasted


def test_more_budget_means_more_data_and_more_fit():
    small = plan_budget(30, QUICKSTART, tokens_per_sample=TOKENS)
    large = plan_budget(60, QUICKSTART, tokens_per_sample=TOKENS)
    assert large.num_samples > small.num_samples and large.fit_minutes > small.fit_minutes


def test_epoch_rule_bounds_repeats():
    plan = plan_budget(60, QUICKSTART, tokens_per_sample=TOKENS, max_epochs=4.0, batch_size=4)
    check_invariants(plan)
    assert plan.limited_by == "max_epochs" and plan.epochs <= 4.0 + 1e-6
    assert plan.epochs >= 3.9  # and the split is tight, not merely below


def test_slow_capture_keeps_the_fit_share():
    t = fake(capture_tokens_per_s=100)  # capture ~3 s per conversation, training fast
    plan = plan_budget(60, t, tokens_per_sample=TOKENS, fit_fraction=0.6)
    check_invariants(plan)
    assert plan.limited_by == "fit_fraction"
    fixed = plan.total_s - plan.num_samples * TOKENS / 100 - plan.fit_s  # everything but train capture + fit
    variable = plan.budget_s - plan.margin_s - fixed
    assert plan.fit_s >= 0.6 * variable - 1 and plan.fit_s <= 0.6 * variable + TOKENS / 100 + 1


def test_minimum_sizes_win_over_the_ratio():
    t = fake(capture_tokens_per_s=40)  # very slow capture: the ratio alone would give < 64 conversations
    plan = plan_budget(30, t, tokens_per_sample=TOKENS, min_samples=64)
    check_invariants(plan)
    assert plan.num_samples == 64 and plan.limited_by == "min_samples"


def test_min_fit_wins_over_more_data():
    t = fake(capture_tokens_per_s=100, train_step_s=0.01)  # a fit this fast would want far more data
    plan = plan_budget(30, t, tokens_per_sample=TOKENS, min_fit_minutes=5.0, fit_fraction=0.0, max_epochs=0.1)
    check_invariants(plan, min_fit_minutes=5.0)
    assert plan.limited_by == "min_fit_minutes"


def test_max_samples_caps_data_and_gives_the_rest_to_fit():
    free = plan_budget(60, QUICKSTART, tokens_per_sample=TOKENS)
    capped = plan_budget(60, QUICKSTART, tokens_per_sample=TOKENS, max_samples=500)
    check_invariants(capped)
    assert capped.num_samples == 500 and capped.limited_by == "max_samples"
    assert capped.fit_minutes > free.fit_minutes


def test_too_small_budget_is_refused_naming_the_minimum():
    with pytest.raises(ValueError) as err:
        plan_budget(5, QUICKSTART, tokens_per_sample=TOKENS)
    message = str(err.value)
    assert "5-minute budget is too small" in message and "--budget_minutes" in message
    minimum = int(message.split("need at least ")[1].split(" minutes")[0])
    check_invariants(plan_budget(minimum, QUICKSTART, tokens_per_sample=TOKENS))  # the named minimum works
    with pytest.raises(ValueError):
        plan_budget(minimum - 1, QUICKSTART, tokens_per_sample=TOKENS)  # and is the smallest whole minute


def test_regenerating_train_answers_costs_time_and_data():
    plain = plan_budget(60, QUICKSTART, tokens_per_sample=TOKENS)
    regen = plan_budget(60, QUICKSTART, tokens_per_sample=TOKENS, regenerate_fraction=1.0)
    check_invariants(regen)
    assert regen.stages["regenerate"] > plain.stages["regenerate"] and regen.num_samples < plain.num_samples
    none = plan_budget(60, QUICKSTART, tokens_per_sample=TOKENS, regenerate_val=False)
    assert none.stages["regenerate"] == 0.0


def test_fixed_costs_are_counted():
    plan = plan_budget(30, QUICKSTART, tokens_per_sample=TOKENS, eval_prompts=20, eval_new_tokens=128)
    assert plan.stages["install"] == 72 and plan.stages["measure"] == 10
    assert plan.stages["evaluate"] == pytest.approx(240 + 15)
    assert plan.stages["export"] == pytest.approx(10 + 15)
    assert plan.stages["regenerate"] == pytest.approx(32 * 128 / 176)


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="Throughputs.train_step_s must be a positive"):
        fake(train_step_s=0)
    with pytest.raises(ValueError, match="Throughputs.install_s must be a non-negative"):
        fake(install_s=-1)
    with pytest.raises(ValueError, match="capture_tokens_per_s"):
        fake(capture_tokens_per_s=math.nan)
    with pytest.raises(ValueError, match="margin_fraction"):
        plan_budget(30, QUICKSTART, tokens_per_sample=TOKENS, margin_fraction=1.0)
    with pytest.raises(ValueError, match="max_samples"):
        plan_budget(30, QUICKSTART, tokens_per_sample=TOKENS, max_samples=10)


def test_max_time_string():
    plan = plan_budget(30, QUICKSTART, tokens_per_sample=TOKENS)
    h, m, s = (int(x) for x in plan.trainer_max_time().split(":")[1:])
    assert plan.trainer_max_time().startswith("00:") and h * 3600 + m * 60 + s == int(plan.fit_s)


def test_format_plan_and_plan_vs_actual():
    plan = plan_budget(30, QUICKSTART, tokens_per_sample=TOKENS)
    text = format_plan(plan)
    assert text.splitlines()[0] == "time budget 30.0 min (margin 3.0 min); plan:"
    for stage in STAGES:
        assert f"  {stage} " in text
    assert f"{plan.num_samples:,} train + 32 val conversations" in text
    assert f"~{plan.max_steps:,} steps" in text and "20 prompts x 128 new tokens" in text
    actual = {"install": 80, "regenerate": 25, "capture": 210, "fit": plan.stages["fit"], "evaluate": 250,
              "num_samples": plan.num_samples - 3, "steps": 3000, "measured_al": 1.8}
    vs = format_plan_vs_actual(plan, actual)
    assert "within budget" in vs and "not measured: measure, export" in vs
    assert f"{plan.num_samples - 3:,} captured" in vs and "3,000 done" in vs and "measured_al: 1.8" in vs
    over = format_plan_vs_actual(plan, {s: 400.0 for s in STAGES})
    assert "OVER budget by 16.7 min" in over
