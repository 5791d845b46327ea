"""``python -m specforge_lightning evaluate``: JSON keys, the PNG, held-out prompts, prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from specforge_lightning.errors import UserError

from specforge_lightning import cli
from specforge_lightning.evaluation.prompts import first_user_turn, held_out_skip, read_prompt_file
from tests.export.test_export import make_checkpoint

FIT_CONFIG = {
    "trainer": {"max_steps": 1},
    "model": {"class_path": "specforge_lightning.algorithms.eagle3.Eagle3Module", "init_args": {"ttt_length": 2}},
    "data": {
        "class_path": "specforge_lightning.datamodules.FeatureDataModule",
        "init_args": {
            "prepare": {"target": "tiny-llama", "corpus": "sharegpt", "num_samples": 24, "num_val_samples": 4,
                        "skip_samples": 2, "max_length": 64, "draft_vocab_size": 128},
        },
    },
}
KEYS = {
    "acceptance_length", "simulated_acceptance_length", "per_position_acceptance", "per_position_definition",
    "speedup", "settings", "target_tokens_per_s", "speculative_tokens_per_s", "per_prompt", "teacher_forced_accuracy",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    from specforge_lightning.algorithms.registry import strategy_spec
    from specforge_lightning.target.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("evaluate")
    ckpt, _ = make_checkpoint(root)
    fit = json.loads(json.dumps(FIT_CONFIG))
    prep = fit["data"]["init_args"]["prepare"]
    prep.update(output_dir=str(root / "feats"), capture_dtype="float32", compute_dtype="float32")
    prepare(PrepareConfig(**prep), strategy_spec("eagle3"), progress=False)  # held-out prompts start where this stopped reading
    config = root / "fit.yaml"
    config.write_text(yaml.safe_dump(fit))
    return ckpt, config


def _prep_of(setup) -> dict:
    return yaml.safe_load(setup[1].read_text())["data"]["init_args"]["prepare"]


def run(config: Path, ckpt: Path | str, out: Path, *extra: str) -> dict:
    cli.main(["evaluate", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(out),
              "--max_new_tokens", "8", "--k", "3", "--dtype", "float32", "--threads", "1", "--device", "cpu", *extra])
    return json.loads(out.read_text())


def test_evaluate_on_held_out_prompts_writes_json_and_png(setup, tmp_path, capsys):
    ckpt, config = setup
    res = run(config, ckpt, tmp_path / "al.json", "--num_prompts", "2")
    assert KEYS <= set(res)
    assert res["num_prompts"] == 2 and res["identical_outputs"] == 2
    assert len(res["per_position_acceptance"]) == 3 and len(res["per_prompt"]) == 2
    assert res["acceptance_length"] >= 1.0 and res["simulated_acceptance_length"] >= 1.0
    s = res["settings"]
    # --k 3 is the chain shorthand: SGLang counts it num_steps 3, topk 1, num_draft_tokens 4 (the root included)
    assert (s["k"], s["num_steps"], s["topk"], s["num_draft_tokens"], s["draft_threshold"]) == (3, 3, 1, 4, None)
    assert (s["temperature"], s["top_p"], s["seed"], s["max_new_tokens"], s["dtype"], s["threads"]) == (
        0.0, 1.0, 0, 8, "float32", 1)
    assert s["decode_linear_layers"] > 0  # CPU float32: the target's and the draft's layers decode through DecodeLinear
    assert len(s["chat_template_hash"]) == 64 and "held-out" in s["prompts"] and f"from index {held_out_skip(_prep_of(setup))}" in s["prompts"]
    assert res["draft"]["aux_layer_ids"] == [1, 3, 4] and res["draft"]["kind"] == "checkpoint"
    png = tmp_path / "al.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "acceptance length: measured" in printed and "speedup" in printed


def test_evaluate_prompt_file_and_exported_folder_agree(setup, tmp_path):
    ckpt, config = setup
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "What is speculative decoding?"}) + "\n\n"
        + json.dumps({"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}]})
        + "\n"
    )
    a = run(config, ckpt, tmp_path / "a.json", "--prompts", str(prompts))
    folder = tmp_path / "hf"
    cli.main(["export", "--ckpt_path", str(ckpt), "--format", "hf", "--output_dir", str(folder)])
    b = run(config, folder, tmp_path / "b.json", "--prompts", str(prompts))
    assert a["num_prompts"] == b["num_prompts"] == 2 and b["draft"]["kind"] == "hf"
    assert [p["output_ids"] for p in a["per_prompt"]] == [p["output_ids"] for p in b["per_prompt"]]
    assert a["per_position_counts"] == b["per_position_counts"]
    assert a["simulated_acceptance_length"] == b["simulated_acceptance_length"]
    assert str(prompts) in a["settings"]["prompts"]


def test_evaluate_refuses_a_foreign_checkpoint(setup, tmp_path, capsys):
    _, config = setup
    bad = tmp_path / "foreign.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as err:
        run(config, bad, tmp_path / "x.json")
    printed = capsys.readouterr().err
    assert err.value.code == 2 and printed.startswith("error: evaluate: ") and str(bad) in printed


def test_held_out_prompts_start_where_prepare_stopped_reading(setup, tmp_path):
    """Held-out prompts never come from a conversation prepare read, used or dropped."""
    from specforge_lightning.data.manifest import read_manifest

    prep = _prep_of(setup)
    manifest = read_manifest(prep["output_dir"])
    skip = held_out_skip(prep)
    assert skip == manifest["corpus_end"]
    assert skip >= prep.get("skip_samples", 0) + prep["num_samples"] + prep["num_val_samples"]
    with pytest.raises(UserError, match="corpus_end"):
        held_out_skip({**prep, "output_dir": str(tmp_path / "nothing")})


def test_prompt_file_formats(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([
        json.dumps({"prompt": "hi"}),
        json.dumps({"conversations": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}),
    ]))
    assert read_prompt_file(f) == [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}],
    ]
    f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no"}) + "\n")
    with pytest.raises(ValueError, match=f"{f}:2"):
        read_prompt_file(f)
    with pytest.raises(ValueError, match="no user message"):
        first_user_turn([{"role": "system", "content": "x"}])


def test_evaluate_tree_sampling_and_sweep(setup, tmp_path, capsys):
    ckpt, config = setup
    res = run(config, ckpt, tmp_path / "t.json", "--num_prompts", "2", "--k", "3", "--sweep", "--no_warmup")
    assert res["identical_outputs"] == 2 and len(res["sweep"]) == 8
    assert all(r["identical_outputs"] == 2 for r in res["sweep"])
    kinds = [(r["policy"]["kind"], r["policy"]["topk"], r["policy"]["num_draft_tokens"]) for r in res["sweep"]]
    assert kinds[:3] == [("chain", 1, 4), ("chain", 1, 6), ("chain", 1, 8)] and ("tree", 4, 16) in kinds
    assert res["sweep"][-1]["policy"]["threshold"] is not None
    assert "sweep tree" in capsys.readouterr().out
    cli.main(["evaluate", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(tmp_path / "s.json"),
              "--max_new_tokens", "8", "--num_steps", "3", "--topk", "2", "--num_draft_tokens", "6",
              "--draft_threshold", "0.01", "--temperature", "0.8", "--top_p", "0.9", "--seed", "7",
              "--dtype", "float32", "--threads", "1", "--device", "cpu", "--num_prompts", "2", "--no_warmup"])
    s = json.loads((tmp_path / "s.json").read_text())
    assert "identical_outputs" not in s and s["num_prompts"] == 2
    assert {k: s["settings"][k] for k in ("num_steps", "topk", "num_draft_tokens", "draft_threshold", "temperature",
                                          "top_p", "seed", "k")} == {
        "num_steps": 3, "topk": 2, "num_draft_tokens": 6, "draft_threshold": 0.01, "temperature": 0.8,
        "top_p": 0.9, "seed": 7, "k": None}
    assert s["policy"]["kind"] == "tree" and s["drafted_tokens"] == s["accepted_tokens"] + s["rejected_tokens"]
    assert "tree (EAGLE-2/SGLang)" in s["settings"]["drafting"]


def test_policy_flags_count_as_sglang():
    import argparse

    from specforge_lightning.evaluation.policy import add_policy_arguments, resolve_policy

    p = argparse.ArgumentParser()
    add_policy_arguments(p)
    spec = lambda *a: resolve_policy(p.parse_args(list(a)))  # noqa: E731
    assert (spec().num_steps, spec().num_draft_tokens) == (5, 6)
    assert (spec("--k", "3").num_steps, spec("--k", "3").num_draft_tokens) == (3, 4)
    assert spec("--num_draft_tokens", "4").num_steps == 3
    assert spec("--num_steps", "4", "--topk", "4", "--num_draft_tokens", "16").max_nodes == 15
    assert spec("--num_steps", "2", "--topk", "2", "--num_draft_tokens", "16").max_nodes == 6  # 2 + 2*2 candidates
    with pytest.raises(UserError, match="--num_draft_tokens"):
        spec("--topk", "2")
    with pytest.raises(UserError, match="--k is the chain shorthand"):
        spec("--k", "3", "--topk", "2")
