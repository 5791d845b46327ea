"""``plan``: argument handling and JSON output with faked machine speeds (the arithmetic: test_budget.py)."""

import json

import pytest

from specforge_lightning import plan_command
from specforge_lightning.cli import main
from specforge_lightning.plan_command import Measured, plan_from_json

FAST = Measured(capture_tokens_per_s=900.0, regenerate_tokens_per_s=180.0, greedy_tokens_per_s=21.7,
                tokens_per_sample=296.0, target_load_s=1.0,
                precision={"compute_dtype": "bfloat16", "capture_dtype": "bfloat16", "eval_dtype": "float32"})


@pytest.fixture()
def measured(monkeypatch):
    calls = []

    def fake(prep, *, conversations, eval_dtype):
        calls.append((prep.output_dir, conversations, eval_dtype))
        return FAST

    monkeypatch.setattr(plan_command, "measure_machine", fake)
    return calls


def test_plan_writes_json_and_prints_the_plan_and_the_fit_overrides(measured, tmp_path, capsys):
    out = tmp_path / "run" / "plan.json"
    main(["plan", "--config", "configs/eagle3.yaml", "--budget_minutes", "30", "--out", str(out), "--install_s", "60"])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert measured == [("outputs/features/eagle3-smollm2", 8, "float32")]
    plan = data["plan"]
    assert data["enabled"] and plan["num_samples"] % 64 == 0 and plan["num_samples"] >= 64
    assert plan["total_s"] + plan["margin_s"] <= 30 * 60 + 1e-6 and plan["stages"]["install"] == 60
    assert data["overrides"] == [
        f"--data.init_args.prepare.num_samples={plan['num_samples']}",
        f"--data.init_args.prepare.output_dir=outputs/features/eagle3-smollm2-n{plan['num_samples']}",
        f"--trainer.max_time={plan_from_json(out).trainer_max_time()}",
    ]
    assert "time budget 30.0 min" in printed and "  fit " in printed
    assert printed.rstrip().splitlines()[-1] == "fit overrides: " + " ".join(data["overrides"])
    assert plan_from_json(out).num_samples == plan["num_samples"]


def test_budget_zero_switches_the_planner_off_without_measuring(measured, tmp_path, capsys):
    out = tmp_path / "plan.json"
    main(["plan", "--config", "configs/eagle3.yaml", "--budget_minutes", "0", "--out", str(out)])
    assert measured == [] and json.loads(out.read_text())["overrides"] == []
    assert plan_from_json(out) is None and "planner off" in capsys.readouterr().out


def test_a_budget_too_small_is_one_error_naming_the_minimum(measured, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["plan", "--config", "configs/eagle3.yaml", "--budget_minutes", "2", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "error: plan: a 2-minute budget is too small" in err and "--budget_minutes" in err


def test_a_given_step_time_replaces_the_estimate(measured, tmp_path):
    out = tmp_path / "plan.json"
    main(["plan", "--config", "configs/eagle3.yaml", "--out", str(out), "--train_step_s", "1.5"])
    assert json.loads(out.read_text())["plan"]["train_step_s"] == 1.5


def test_the_step_estimate_follows_the_capture_speed():
    slow = Measured(**{**FAST.__dict__, "capture_tokens_per_s": 450.0})
    assert plan_command.estimate_train_step_s(FAST, 2) == pytest.approx(0.284, rel=0.01)
    assert plan_command.estimate_train_step_s(slow, 2) == pytest.approx(2 * 0.284, rel=0.01)


def test_actual_stages_of_a_run_without_outputs_leaves_what_it_cannot_know(tmp_path):
    actual = plan_command.actual_stages(tmp_path, install_s=1, measure_s=2, fit_s=30, evaluate_s=4, export_s=5)
    assert actual == {"install": 1, "measure": 2, "evaluate": 4, "export": 5, "capture": 0.0, "fit": 30, "regenerate": 0.0}
