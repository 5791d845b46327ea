"""evaluate reads what the run used (its saved config.yaml), and a user's prompt file is never cut silently."""

from __future__ import annotations

import json

import pytest

from specforge_lightning import cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_config")
    feats, run = root / "feats-override", root / "run"
    cli.main(["fit", "--config", "configs/eagle3-tiny.yaml", f"--data.init_args.prepare.output_dir={feats}",
              f"--trainer.default_root_dir={run}", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
              "--trainer.logger=false"])
    return root, run


def evaluate(ckpt, out, *extra):
    cli.main(["evaluate", "--ckpt_path", str(ckpt), "--output", str(out), "--max_new_tokens", "4", "--k", "2",
              "--dtype", "float32", "--threads", "1", "--device", "cpu", "--no_warmup", *extra])
    return json.loads(out.read_text())


def test_evaluate_finds_the_features_of_a_run_trained_with_overrides(run, capsys):
    root, folder = run
    ckpt = folder / "checkpoints" / "last.ckpt"
    assert (folder / "config.yaml").is_file()
    alone = evaluate(ckpt, root / "a.json", "--num_prompts", "1")  # no --config at all
    assert alone["num_prompts"] == 1 and alone["identical_outputs"] == 1
    # The recipe file points at outputs/features/eagle3-tiny, which this run never used: the run's config wins.
    recipe = evaluate(ckpt, root / "b.json", "--num_prompts", "1", "--config", "configs/eagle3-tiny.yaml")
    assert f"reading data.prepare from {folder / 'config.yaml'}" in capsys.readouterr().out
    assert recipe["settings"]["prompts"] == alone["settings"]["prompts"]


def test_a_prompt_file_is_evaluated_whole_unless_num_prompts_says_otherwise(run, tmp_path, capsys):
    _, folder = run
    ckpt = folder / "checkpoints" / "last.ckpt"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say {w} twice."}) for w in ("hi", "yes", "no")) + "\n")
    assert evaluate(ckpt, tmp_path / "all.json", "--prompts", str(prompts))["num_prompts"] == 3
    capsys.readouterr()
    assert evaluate(ckpt, tmp_path / "two.json", "--prompts", str(prompts), "--num_prompts", "2")["num_prompts"] == 2
    assert f"evaluating the first 2 of the 3 prompts in {prompts}" in capsys.readouterr().out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit) as err:
        evaluate(ckpt, tmp_path / "none.json", "--prompts", str(empty))
    assert err.value.code == 2 and str(empty) in capsys.readouterr().err
