"""The command line end to end on the tiny target: fit with the shipped config, overrides, errors."""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest

from specforge_lightning.cli import main


def _tiny(tmp_path, *extra):
    return [
        "fit", "--config", "configs/eagle3-tiny.yaml",
        f"--data.init_args.prepare.output_dir={tmp_path / 'feats'}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",  # writes under default_root_dir
        *extra,
    ]


def test_fit_tiny_config_logs_checkpoints_and_plugs_a_user_callback(tmp_path):
    main(_tiny(
        tmp_path, "--trainer.max_steps=10", "--trainer.val_check_interval=5",
        "--trainer.callbacks+=callbacks.acceptance_plot.AcceptancePlot",
    ))
    run = tmp_path / "run"
    (metrics,) = run.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    als = [float(r["val/acceptance_length"]) for r in rows if r.get("val/acceptance_length")]
    assert len(als) == 2 and all(a >= 1.0 for a in als)
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "best.json").exists()
    assert list(run.glob("**/acceptance_by_position.png"))


def test_unknown_key_fails_before_any_work_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_tiny(tmp_path, "--model.init_args.ttt_lenght=3"))
    assert "ttt_lenght" in capsys.readouterr().err
    assert not (tmp_path / "feats").exists()


def test_prepare_reads_the_fit_config_and_rejects_unknown_keys(tmp_path, capsys):
    main(["prepare", "--config", "configs/eagle3-tiny.yaml", f"--output_dir={tmp_path / 'feats'}", "--num_samples=6",
          "--num_val_samples=2"])
    assert "prepared 6 train samples" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nnum_sample: 3\n")
    with pytest.raises(SystemExit) as exit:
        main(["prepare", "--config", str(bad)])
    assert exit.value.code == 2
    assert "error: unknown key(s) 'num_sample' (did you mean 'num_samples'?)" in capsys.readouterr().err


def test_unknown_command_is_named(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fitt"])
    assert exit.value.code == 2 and "error: unknown command 'fitt'" in capsys.readouterr().err


def _built_trainer(tmp_path, *extra):
    from specforge_lightning.cli import build_cli

    args = ["--config", "configs/eagle3-tiny.yaml", f"--data.init_args.prepare.output_dir={tmp_path / 'feats'}",
            f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false", *extra]
    return build_cli(args, run=False).trainer


def test_the_default_progress_bar_is_throttled_and_a_given_one_wins(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from specforge_lightning.cli import PROGRESS_REFRESH_PER_S
    from specforge_lightning.runtime import progress
    from specforge_lightning.runtime.fit_progress import PlainProgressLogger

    piped = _built_trainer(tmp_path)  # pytest's stdout is no TTY: plain lines, no bar
    assert piped.progress_bar_callback is None
    assert [c.interval_s for c in piped.callbacks if isinstance(c, PlainProgressLogger)] == [30.0]
    monkeypatch.setattr(progress, "is_tty", lambda stream: True)
    bar = _built_trainer(tmp_path).progress_bar_callback
    assert isinstance(bar, RichProgressBar) and bar.refresh_rate == PROGRESS_REFRESH_PER_S == 2
    mine = _built_trainer(tmp_path, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",
                          "--trainer.callbacks.refresh_rate=7").progress_bar_callback
    assert isinstance(mine, TQDMProgressBar) and mine.refresh_rate == 7
    assert _built_trainer(tmp_path, "--trainer.enable_progress_bar=false").progress_bar_callback is None


# ------------------------------------------------------------------ one error boundary for every subcommand


@pytest.fixture()
def failing_prepare(monkeypatch):
    from specforge_lightning import cli

    def use(exc: BaseException) -> None:
        def run(args):
            raise exc

        monkeypatch.setitem(cli.COMMANDS, "prepare", run)

    monkeypatch.delenv("SPECFORGE_DEBUG", raising=False)
    return use


def test_a_user_error_is_one_line_and_exit_2_a_bug_keeps_its_traceback(failing_prepare, capsys, monkeypatch):
    from specforge_lightning.errors import UserError

    failing_prepare(UserError("f.yaml: data.prepare.x is wrong; set y"))
    with pytest.raises(SystemExit) as exit:
        main(["prepare"])
    assert exit.value.code == 2 and capsys.readouterr().err == "error: f.yaml: data.prepare.x is wrong; set y\n"
    monkeypatch.setenv("SPECFORGE_DEBUG", "1")
    with pytest.raises(UserError):
        main(["prepare"])
    failing_prepare(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["prepare"])
    failing_prepare(KeyboardInterrupt())
    monkeypatch.delenv("SPECFORGE_DEBUG")
    with pytest.raises(SystemExit) as exit:
        main(["prepare"])
    assert exit.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_config_with_a_yaml_error_is_named_with_its_line(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("data:\n  prepare: {num_samples: 3\n")
    for command in ("prepare", "show-mask"):
        with pytest.raises(SystemExit) as exit:
            main([command, "--config", str(bad)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"error: {bad}:3:") and "invalid YAML" in err


def test_prepare_takes_the_layer_preset_of_the_algorithm(monkeypatch):
    from specforge_lightning import cli

    assert cli.module_spec("specforge_lightning.algorithms.dflash.DFlashModule", "f.yaml").layer_preset == "spread:5"
    assert cli.algorithm_spec("eagle3").layer_preset == "eagle3"
    from specforge_lightning.errors import UserError

    with pytest.raises(UserError, match="--algorithm eagle4: unknown algorithm"):
        cli.algorithm_spec("eagle4")
    with pytest.raises(UserError, match="f.yaml: model.class_path 'no.such.Module' cannot be imported"):
        cli.module_spec("no.such.Module", "f.yaml")
    seen = {}
    monkeypatch.setattr("specforge_lightning.target.prepare.prepare",
                        lambda cfg, spec=None: seen.update(cfg=cfg, spec=spec) or {"splits": {}})
    main(["prepare", "--config", "configs/dflash-tiny.yaml"])
    assert seen["spec"].layer_preset == "spread:5"  # prepare uses it where the section names no layers
    main(["prepare", "--config", "configs/dflash-tiny.yaml", "--algorithm", "eagle3"])
    assert seen["spec"].layer_preset == "eagle3"


# ------------------------------------------------------------------ trust is ours, checked before any unpickling


def test_weights_only_false_needs_the_trust_flag_before_anything_is_loaded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*_tiny(tmp_path), "--weights_only=false", f"--ckpt_path={tmp_path / 'any.ckpt'}"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--trust_checkpoint" in err and "nothing was loaded" in err
    assert not (tmp_path / "feats").exists()


def test_a_checkpoint_with_pickled_objects_is_refused_naming_our_flag_and_loads_with_it(tmp_path, capsys):
    import argparse

    import torch

    main(_tiny(tmp_path, "--trainer.max_steps=2", "--trainer.logger=false"))
    last = tmp_path / "run" / "checkpoints" / "step-00000002.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["extra"] = argparse.Namespace(note="a pickled object")
    pickled = tmp_path / "pickled.ckpt"
    torch.save(checkpoint, pickled)
    with pytest.raises(SystemExit) as exit:
        main(_tiny(tmp_path, "--trainer.max_steps=3", "--trainer.logger=false", f"--ckpt_path={pickled}"))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"checkpoint {pickled} holds pickled objects" in err
    assert "--trust_checkpoint" in err and "weights_only" not in err
    main(_tiny(tmp_path, "--trainer.max_steps=3", "--trainer.logger=false", f"--ckpt_path={pickled}", "--trust_checkpoint=true"))
    assert json.loads((tmp_path / "run" / "checkpoints" / "last.json").read_text())["step"] == 3


# ------------------------------------------------------------------ the run folder is complete


def test_loggers_and_config_live_in_the_run_folder_a_new_version_per_run(tmp_path):
    loggers = tmp_path / "loggers.yaml"
    loggers.write_text(
        "trainer:\n  logger:\n"
        "    - {class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {name: tb}}\n"
        "    - {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {name: csv}}\n"
    )

    def fit(root, *extra):
        main(["fit", "--config", "configs/eagle3-tiny.yaml", "--config", str(loggers), "--trainer.max_steps=2",
              f"--data.init_args.prepare.output_dir={tmp_path / 'feats'}", f"--trainer.default_root_dir={root}",
              "--trainer.enable_progress_bar=false", *extra])

    def versions(root, name):
        return sorted(p.name for p in (root / name).iterdir())

    a, b = tmp_path / "a", tmp_path / "b"
    fit(a)
    fit(a)
    assert versions(a, "tb") == versions(a, "csv") == ["version_0", "version_1"]
    assert "max_steps: 2" in (a / "config.yaml").read_text()  # what the run used, for evaluate/export
    fit(a, "--ckpt_path=last", "--trainer.max_steps=3")
    assert versions(a, "tb") == ["version_0", "version_1"]  # a resume continues TensorBoard's newest
    assert versions(a, "csv") == ["version_0", "version_1", "version_2"]  # Lightning's CSV would overwrite
    fit(b)
    assert versions(b, "tb") == versions(b, "csv") == ["version_0"] and versions(a, "tb") == ["version_0", "version_1"]
    assert (b / "config.yaml").is_file() and not (tmp_path / "runs").exists()


def test_a_logger_save_dir_is_refused_naming_where_it_was_set(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*_tiny(tmp_path), f"--trainer.logger.save_dir={tmp_path / 'elsewhere'}"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--trainer.logger.save_dir" in err and "--trainer.default_root_dir" in err


# ------------------------------------------------------------------ Lightning's own DDP launcher restarts our command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit_ddp(tmp_path, name: str, feats, ranks_env: list[dict] | None) -> list[subprocess.CompletedProcess]:
    """``fit --trainer.devices=2 --trainer.strategy=ddp`` as a user types it (ranks_env None: Lightning
    launches rank 1), or one process per rank with torchrun's variables."""
    cmd = [sys.executable, "-m", "specforge_lightning", "fit", "--config", "configs/eagle3-tiny.yaml",
           "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=4", "--trainer.logger=false",
           "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
           f"--data.init_args.prepare.output_dir={feats}", f"--trainer.default_root_dir={tmp_path / name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(cmd, env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for extra in (ranks_env or [{}])]
    return [subprocess.CompletedProcess(cmd, p.wait(timeout=300), p.communicate()[0]) for p in procs]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fit_on_two_ddp_ranks_launched_by_lightning_equals_a_torchrun_launch(tmp_path):
    import torch

    feats = tmp_path / "feats"
    main(["prepare", "--config", "configs/eagle3-tiny.yaml", f"--output_dir={feats}"])
    (lightning,) = _fit_ddp(tmp_path, "lightning", feats, None)
    assert lightning.returncode == 0, lightning.stdout[-4000:]
    port = str(_free_port())
    ranks = [{"LOCAL_RANK": str(r), "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
             for r in range(2)]
    torchrun = _fit_ddp(tmp_path, "torchrun", feats, ranks)
    assert [p.returncode for p in torchrun] == [0, 0], "\n".join(p.stdout[-3000:] for p in torchrun)
    final = {}
    for name in ("lightning", "torchrun"):
        checkpoint = torch.load(tmp_path / name / "checkpoints" / "step-00000004.ckpt", weights_only=True)
        state = checkpoint["specforge_resume"]
        assert state["world_size"] == 2 and set(state["ranks"]) == {"0", "1"}  # both ranks trained
        final[name] = checkpoint["state_dict"]
        assert all(torch.isfinite(v).all() for v in final[name].values() if v.is_floating_point())
    assert final["lightning"].keys() == final["torchrun"].keys()
    assert all(torch.equal(final["lightning"][k], final["torchrun"][k]) for k in final["lightning"])


def test_show_mask_on_a_corpus_without_assistant_turns_names_the_corpus(tmp_path):
    import json as _json
    import subprocess as _sp
    import sys as _sys

    corpus = tmp_path / "users.jsonl"
    corpus.write_text("\n".join(_json.dumps({"conversations": [{"role": "user", "content": f"hi {i}"}]}) for i in range(3)))
    proc = _sp.run([_sys.executable, "-m", "specforge_lightning", "show-mask", "--target", "tiny-llama",
                    "--corpus", str(corpus), "--index", "0"], capture_output=True, text=True, timeout=120,
                   env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and str(corpus) in proc.stderr and "Traceback" not in proc.stderr
