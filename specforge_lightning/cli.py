"""Command line: LightningCLI for fit/validate/test, plain commands for the rest.

    python -m specforge_lightning fit --config configs/eagle3.yaml [--trainer.max_steps=100 ...]
    python -m specforge_lightning prepare --config configs/eagle3.yaml [--num_samples=64 ...]
    python -m specforge_lightning show-mask --config configs/eagle3.yaml --index 0
    python -m specforge_lightning evaluate --config configs/eagle3.yaml --ckpt_path ... --output al.json
    python -m specforge_lightning export --ckpt_path ... --format sglang --output_dir ...
    python -m specforge_lightning produce --config configs/eagle3-tiny-stream.yaml
    python -m specforge_lightning plan --config configs/eagle3.yaml --budget_minutes 30 --out plan.json

Every command reads a fit config with ``--config FILE`` and takes ``--key=value`` overrides.
A mistake of the user's (a UserError) prints ``error: <message>`` and exits 2; a bug keeps
its traceback; SPECFORGE_DEBUG=1 shows the traceback of everything.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from specforge_lightning.config_files import RUN_CONFIG, check_fields, load_yaml, model_class_path, section
from specforge_lightning.config_files import nested_null_resets
from specforge_lightning.errors import UserError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# Lightning's rich bar re-renders on a thread up to 100 times a second by default; on 2 cores that
# took ~7% of every quickstart step (305 vs 283 ms). Two renders a second show the same progress.
PROGRESS_REFRESH_PER_S = 2
TRUST_FLAG = "--trust_checkpoint"
DEBUG_ENV = "SPECFORGE_DEBUG"
# Loggers that continue in their newest version folder on a resume (TensorBoard appends a new
# event file); others start a new version: Lightning's CSVLogger deletes metrics.csv in an existing one.
CONTINUING_LOGGERS = ("lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.tensorboard.TensorBoardLogger")


def _quiet_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- fit / validate / test


def _newest_version(folder: str) -> str | None:
    """``version_N`` with the largest N in ``folder``, or None."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    versions = [(int(n.split("_", 1)[1]), n) for n in names if n.startswith("version_") and n.split("_", 1)[1].isdigit()]
    return max(versions)[1] if versions else None


def _run_root(default_root_dir: str | None) -> str:
    """The run folder, as the Trainer resolves ``default_root_dir`` (None: the working directory)."""
    return os.fspath(default_root_dir) if default_root_dir else os.getcwd()


def _given_logger_save_dirs(args: Sequence[str]) -> list[str]:
    """Where the user set a logger's save_dir (config files and flags): it would be overridden."""
    found = []
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[0]
        if name.startswith("--trainer.logger") and name.endswith(".save_dir"):
            found.append(f"flag {name}")
        if name in ("--config", "-c"):
            path = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else None)
            if path and os.path.isfile(path):
                loggers = section(load_yaml(path), "trainer", source=path).get("logger")
                for entry in loggers if isinstance(loggers, list) else [loggers]:
                    if isinstance(entry, dict) and "save_dir" in (entry.get("init_args") or {}):
                        found.append(f"{path}: trainer.logger {entry.get('class_path')} save_dir")
    return found


def _cli_class():
    """LightningCLI with our always-on callbacks, a complete run folder and an honest ``--ckpt_path``.

    Stock LightningCLI merges a checkpoint's hyperparameters OVER the command
    line when ``--ckpt_path`` names a file, and opens that file with a bare
    ``torch.load``. Here the configuration given now wins for everything;
    ``ResumeState`` refuses a resume whose loss options, batch size,
    accumulation, world size or features changed, naming each difference, and
    checks the file before anything is restored. Loggers write under
    ``trainer.default_root_dir`` (a new version per run, the same one on a resume for
    TensorBoard) and the resolved config is saved as ``<default_root_dir>/config.yaml``.
    """
    from jsonargparse._actions import _ActionPrintConfig
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from specforge_lightning.callbacks import GracefulPreemption, ResumeState, SpecForgeCheckpoint, find_best_checkpoint
    from specforge_lightning.runtime import progress
    from specforge_lightning.runtime.config_precision import resolve_run_config
    from specforge_lightning.runtime.fit_progress import PlainProgressLogger, interval_from_env
    from specforge_lightning.runtime.precision import announce

    class RunConfig(SaveConfigCallback):
        """The resolved config of a fit, as ``<default_root_dir>/config.yaml`` (validate/test keep the fit's)."""

        def save_config(self, trainer, pl_module, stage: str) -> None:
            if stage != "fit":
                return
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            path = os.path.join(trainer.default_root_dir, RUN_CONFIG)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)

    class SpecForgeCLI(LightningCLI):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("save_config_callback", RunConfig)
            kwargs["save_config_kwargs"] = {**kwargs.get("save_config_kwargs", {}), "save_to_log_dir": False}
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(SpecForgeCheckpoint, "checkpoint")
            parser.add_lightning_class_args(ResumeState, "resume")
            parser.add_lightning_class_args(GracefulPreemption, "preemption")
            parser.add_argument(
                TRUST_FLAG, type=bool, default=False,
                help="DANGEROUS: let --ckpt_path unpickle objects other than tensors, which runs code from the "
                "file; only for a checkpoint you wrote yourself. Needed for --weights_only=false.",
            )
            # The run folder is complete: every logger writes under the run's own default_root_dir.
            parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=_run_root)
            _accept_auto_precision(parser)

        def parse_arguments(self, parser, args) -> None:
            """Parse, then decide every precision ``auto`` (runtime.config_precision), so that the Trainer,
            the model, ``config.yaml`` and ``--print_config`` all see the concrete values."""
            with _ActionPrintConfig.skip_print_config():
                super().parse_arguments(parser, args)
            sub = self.config.get("subcommand")
            try:
                choice = resolve_run_config(self.config[sub] if sub else self.config)
            except ValueError as e:
                raise UserError(f"precision auto: {e}") from None
            if choice is not None:
                announce(choice)
            _ActionPrintConfig.print_config_if_requested(parser, self.config)

        def before_instantiate_classes(self) -> None:
            sub = self.config.get("subcommand")
            cfg = self.config[sub] if sub else self.config
            if cfg.get("weights_only") is False and not cfg.get("trust_checkpoint"):
                raise UserError(
                    f"--weights_only=false unpickles the checkpoint, which runs code from the file; pass {TRUST_FLAG} "
                    "as well if you wrote it yourself (nothing was loaded)"
                )
            if cfg.get("trust_checkpoint"):
                cfg["weights_only"] = False
            if cfg.get("ckpt_path"):  # a resume continues in the newest version where the logger allows it
                loggers = cfg.get("trainer", {}).get("logger")
                for logger in loggers if isinstance(loggers, list) else [loggers]:
                    if getattr(logger, "class_path", None) in CONTINUING_LOGGERS and logger.init_args.get("version") is None:
                        args = logger.init_args
                        newest = _newest_version(os.path.join(args.get("save_dir") or ".", args.get("name") or ""))
                        if newest is not None:
                            args["version"] = newest

        def instantiate_trainer(self, **kwargs):
            """The default progress: on a TTY the rich bar, throttled (``PROGRESS_REFRESH_PER_S``); otherwise
            plain lines every ``SPECFORGE_PROGRESS_INTERVAL_S`` (30) seconds. A bar the user gives wins."""
            trainer = self._get(self.config_init, "trainer", default={})
            given = trainer.get("callbacks") or []
            given = list(given) if isinstance(given, list) else [given]
            wants_bar = trainer.get("enable_progress_bar") is not False
            if wants_bar and "callbacks" not in kwargs and not any(isinstance(c, ProgressBar) for c in given):
                if progress.is_tty(sys.stdout):
                    kwargs["callbacks"] = [*given, RichProgressBar(refresh_rate=PROGRESS_REFRESH_PER_S)]
                else:  # a redrawn bar shows nothing in a piped log
                    kwargs["callbacks"] = [*given, PlainProgressLogger(interval_from_env())]
                    kwargs["enable_progress_bar"] = False
            return super().instantiate_trainer(**kwargs)

        def _parse_ckpt_path(self) -> None:
            if not self.config.get("subcommand"):
                return
            cfg = self.config[self.config.subcommand]
            if cfg.get("ckpt_path") == "best":
                root = cfg.get("trainer", {}).get("default_root_dir") or "."
                best = find_best_checkpoint(os.path.join(root, "checkpoints"))
                if best is None:
                    raise UserError(f"--ckpt_path best: no best checkpoint under {root}/checkpoints (no best.json there)")
                cfg["ckpt_path"] = best

    return SpecForgeCLI


def _accept_auto_precision(parser) -> None:
    """Let ``trainer.precision`` say ``auto`` (Lightning's type lists only concrete values).

    ``SpecForgeCLI.parse_arguments`` replaces it before anything reads it.
    """
    from typing import Literal, Optional, Union

    for action in parser._actions:
        if action.dest == "trainer.precision" and hasattr(action, "_typehint"):
            action._typehint = Optional[Union[Literal["auto"], action._typehint]]


def run_lightning(args: Sequence[str]) -> None:
    """Run LightningCLI on ``args`` (``fit --config ...``) with ``sys.argv`` holding that command line.

    Lightning's DDP launcher restarts ranks 1..N as ``python -m specforge_lightning`` +
    ``sys.argv[1:]``; so the command line stays in ``sys.argv`` while the CLI runs (and
    LightningCLI reads it from there), also when ``main(argv)`` is called from Python.
    """
    args, given = nested_null_resets(args), _given_logger_save_dirs(args)
    if given:
        raise UserError(
            f"logger save_dir is set ({'; '.join(given)}), but loggers write under trainer.default_root_dir, the run's "
            "own folder: remove save_dir and set --trainer.default_root_dir=DIR instead"
        )
    saved = sys.argv
    sys.argv = [saved[0] if saved else "specforge_lightning", *args]
    try:
        build_cli(None)
    finally:
        sys.argv = saved


def build_cli(args: Sequence[str] | None, run: bool = True) -> Any:
    """The project's LightningCLI on ``args`` (None: ``sys.argv``); ``run=False`` only builds model, data, trainer.

    The one construction of the CLI, so a test that builds a run without running it (``run=False``)
    gets exactly the model, datamodule, trainer and seed a ``fit`` on the command line gets.
    """
    import lightning as L

    return _cli_class()(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        seed_everything_default=0,
        run=run,
    )


# --------------------------------------------------------------------------- plain commands


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag value`` or ``--flag=value``; the last one wins)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def algorithm_spec(name: str):
    """The StrategySpec of the registered algorithm ``name`` (the one place the CLI asks the registry)."""
    from specforge_lightning.algorithms import registry

    try:
        return registry.get_algorithm(name).spec
    except KeyError as e:
        raise UserError(f"--algorithm {name}: {e.args[0]}") from None


def module_spec(class_path: str, source: str):
    """The StrategySpec that the LightningModule named by ``model.class_path`` declares."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"{source}: model.class_path {class_path!r} cannot be imported: {e}") from None
    return cls.strategy_spec


def cmd_prepare(args: Sequence[str]) -> None:
    from dataclasses import fields

    from jsonargparse import ArgumentParser

    from specforge_lightning.target.prepare import PrepareConfig, prepare

    parser = ArgumentParser(prog="specforge_lightning prepare", description="Capture target features to disk.")
    parser.add_argument("--config", type=str, default=None, help="a fit config (uses data.prepare) or a prepare YAML")
    parser.add_argument("--algorithm", type=str, default=None,
                        help="registered algorithm whose layer preset is captured (default: the config's model)")
    parser.add_class_arguments(PrepareConfig, as_group=False)
    known = [f.name for f in fields(PrepareConfig)]
    path = flag_value(args, "--config")
    config: dict[str, Any] = {}
    if path:
        config = load_yaml(path)
        values = section(config, "data.prepare", source=path) if "data" in config else config
        check_fields(values, known, where=f"data.prepare of {path}" if "data" in config else path)
        parser.set_defaults(**values)
    ns = parser.parse_args(list(args))
    cfg = PrepareConfig(**{k: getattr(ns, k) for k in known})
    model = model_class_path(config, source=path or "")
    spec = algorithm_spec(ns.algorithm) if ns.algorithm else module_spec(model, path) if model else None
    manifest = prepare(cfg, spec)
    train = manifest["splits"].get("train", {})
    print(
        f"prepared {train.get('num_samples', 0)} train samples ({train.get('num_tokens', 0)} tokens) "
        f"in {cfg.output_dir}; manifest: {os.path.join(cfg.output_dir, 'manifest.json')}"
    )


SHOW_MASK_FIELDS = ("target", "corpus", "max_length", "train_only_last_turn")


def cmd_show_mask(args: Sequence[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="specforge_lightning show-mask", description="Print a sample with its supervised spans highlighted.")
    parser.add_argument("--config", type=str, default=None, help="a fit config: target, corpus, max_length from data.prepare")
    parser.add_argument("--target", type=str, default="smollm2-135m-instruct")
    parser.add_argument("--corpus", type=str, default="sharegpt")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--train_only_last_turn", type=bool, default=False)
    path = flag_value(args, "--config")
    if path:
        values = section(load_yaml(path), "data.prepare", source=path)
        parser.set_defaults(**{k: v for k, v in values.items() if k in SHOW_MASK_FIELDS})
    ns = parser.parse_args(list(args))

    from transformers import AutoTokenizer

    from specforge_lightning.data.chat import print_masked_sample, tokenize_conversation
    from specforge_lightning.data.corpus import conversation_at
    from specforge_lightning.target.zoo import resolve_target

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_target(ns.target)))
    messages = conversation_at(ns.corpus, ns.index)
    ids, mask = tokenize_conversation(tokenizer, messages, ns.max_length, train_only_last_turn=ns.train_only_last_turn)
    print_masked_sample(tokenizer, ids, mask)


def _lazy(module: str, name: str) -> Callable[[Sequence[str]], None]:
    def run(args: Sequence[str]) -> None:
        getattr(importlib.import_module(module), name)(args)

    return run


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "prepare": cmd_prepare,
    "show-mask": cmd_show_mask,
    "produce": _lazy("specforge_lightning.target.producer", "main"),
    "evaluate": _lazy("specforge_lightning.evaluation.command", "main"),
    "export": _lazy("specforge_lightning.export.command", "main"),
    "plan": _lazy("specforge_lightning.plan_command", "main"),
    "fabric": _lazy("specforge_lightning.fabric.command", "main"),
}


# --------------------------------------------------------------------------- entry point


def _dispatch(argv: list[str]) -> None:
    commands = (*LIGHTNING_COMMANDS, *COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(commands))
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in commands:
        raise UserError(f"unknown command {command!r}; choose one of: {', '.join(commands)}")
    if command in LIGHTNING_COMMANDS:
        run_lightning([command, *rest])
    else:
        COMMANDS[command](rest)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; the one error boundary of every subcommand (raises SystemExit with its code).

    UserError (any subclass): ``error: <message>`` on stderr, exit 2, no traceback.
    KeyboardInterrupt: ``interrupted``, exit 130. Anything else keeps its traceback.
    With SPECFORGE_DEBUG=1 every exception is re-raised as is.
    """
    _quiet_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        _dispatch(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
