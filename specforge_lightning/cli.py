"""Command line: LightningCLI for fit/validate/test, plain commands for the rest.

    python -m specforge_lightning fit --config configs/eagle3.yaml [--trainer.max_steps=100 ...]
    python -m specforge_lightning prepare --config configs/eagle3.yaml
    python -m specforge_lightning show-mask --target smollm2-135m-instruct --index 0
    python -m specforge_lightning evaluate --config configs/eagle3.yaml --ckpt_path ... --output al.json
    python -m specforge_lightning export --ckpt_path ... --format sglang --output_dir ...
    python -m specforge_lightning produce --config configs/eagle3-tiny-stream.yaml
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# Lightning's rich bar re-renders on a thread up to 100 times a second by default; on 2 cores that
# took ~7% of every quickstart step (305 vs 283 ms). Two renders a second show the same progress.
PROGRESS_REFRESH_PER_S = 2


def _quiet_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cli_class():
    """LightningCLI with our always-on callbacks and an honest ``--ckpt_path``.

    Stock LightningCLI merges a checkpoint's hyperparameters OVER the command
    line when ``--ckpt_path`` names a file, and opens that file with a bare
    ``torch.load``. Here the configuration given now wins for everything;
    ``ResumeState`` refuses a resume whose loss options, batch size,
    accumulation, world size or features changed, naming each difference, and
    checks the file before anything is restored.
    """
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
    from lightning.pytorch.cli import LightningCLI

    from specforge_lightning.callbacks import GracefulPreemption, ResumeState, SpecForgeCheckpoint, find_best_checkpoint

    class SpecForgeCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(SpecForgeCheckpoint, "checkpoint")
            parser.add_lightning_class_args(ResumeState, "resume")
            parser.add_lightning_class_args(GracefulPreemption, "preemption")

        def instantiate_trainer(self, **kwargs):
            """The default progress bar, throttled (``PROGRESS_REFRESH_PER_S``); a bar the user gives wins."""
            trainer = self._get(self.config_init, "trainer", default={})
            given = trainer.get("callbacks") or []
            given = list(given) if isinstance(given, list) else [given]
            wants_bar = trainer.get("enable_progress_bar") is not False
            if wants_bar and "callbacks" not in kwargs and not any(isinstance(c, ProgressBar) for c in given):
                kwargs["callbacks"] = [*given, RichProgressBar(refresh_rate=PROGRESS_REFRESH_PER_S)]
            return super().instantiate_trainer(**kwargs)

        def _parse_ckpt_path(self) -> None:
            if not self.config.get("subcommand"):
                return
            cfg = self.config[self.config.subcommand]
            if cfg.get("ckpt_path") == "best":
                root = cfg.get("trainer", {}).get("default_root_dir") or "."
                best = find_best_checkpoint(os.path.join(root, "checkpoints"))
                if best is None:
                    raise SystemExit(f"--ckpt_path best: no best checkpoint under {root}/checkpoints")
                cfg["ckpt_path"] = best

    return SpecForgeCLI


def run_lightning(args: Sequence[str]) -> None:
    import lightning as L

    # LightningCLI reads sys.argv when ``args`` is None; hand it ours explicitly and keep argv clean.
    sys.argv = sys.argv[:1]
    _cli_class()(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args),
        seed_everything_default=0,
    )


def _config_section(path: str, section: str) -> dict:
    """Read ``data.prepare`` out of a fit config (or the whole file for a plain prepare YAML)."""
    import yaml

    try:
        with open(path) as f:
            node = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise SystemExit(f"config file not found: {path}") from None
    if "data" not in node:
        return node
    for key in section.split("."):
        node = node.get("init_args", node) if isinstance(node, dict) else {}
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node or {}


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def cmd_prepare(args: Sequence[str]) -> None:
    from jsonargparse import ArgumentParser

    from specforge_lightning.target.prepare import PrepareConfig, prepare

    parser = ArgumentParser(prog="specforge_lightning prepare", description="Capture target features to disk.")
    parser.add_argument("--config", type=str, default=None, help="a fit config (uses data.prepare) or a prepare YAML")
    parser.add_class_arguments(PrepareConfig, as_group=False)
    config = _flag_value(args, "--config")
    if config:
        section = _config_section(config, "data.prepare")
        unknown = sorted(set(section) - set(PrepareConfig.__dataclass_fields__))
        if unknown:
            raise SystemExit(f"prepare: unknown key(s) {unknown} in {config}; known: {sorted(PrepareConfig.__dataclass_fields__)}")
        parser.set_defaults(**section)
    ns = parser.parse_args(list(args))
    cfg = PrepareConfig(**{k: getattr(ns, k) for k in PrepareConfig.__dataclass_fields__})
    manifest = prepare(cfg)
    train = manifest["splits"].get("train", {})
    print(
        f"prepared {train.get('num_samples', 0)} train samples ({train.get('num_tokens', 0)} tokens) "
        f"in {cfg.output_dir}; manifest: {os.path.join(cfg.output_dir, 'manifest.json')}"
    )


def cmd_show_mask(args: Sequence[str]) -> None:
    from jsonargparse import ArgumentParser
    from transformers import AutoTokenizer

    from specforge_lightning.data.chat import print_masked_sample, tokenize_conversation
    from specforge_lightning.data.corpus import load_conversations
    from specforge_lightning.target.zoo import resolve_target

    parser = ArgumentParser(prog="specforge_lightning show-mask", description="Print a sample with its supervised spans highlighted.")
    parser.add_argument("--target", type=str, default="smollm2-135m-instruct")
    parser.add_argument("--corpus", type=str, default="sharegpt")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--train_only_last_turn", type=bool, default=False)
    ns = parser.parse_args(list(args))
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_target(ns.target)))
    messages = load_conversations(ns.corpus, limit=1, skip=ns.index)[0]
    ids, mask = tokenize_conversation(tokenizer, messages, ns.max_length, train_only_last_turn=ns.train_only_last_turn)
    print_masked_sample(tokenizer, ids, mask)


def _lazy(module: str, name: str) -> Callable[[Sequence[str]], None]:
    def run(args: Sequence[str]) -> None:
        import importlib

        getattr(importlib.import_module(module), name)(args)

    return run


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "prepare": cmd_prepare,
    "show-mask": cmd_show_mask,
    "produce": _lazy("specforge_lightning.target.producer", "main"),
    "evaluate": _lazy("specforge_lightning.evaluation.command", "main"),
    "export": _lazy("specforge_lightning.export.command", "main"),
}


def main(argv: Sequence[str] | None = None) -> None:
    _quiet_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = (*LIGHTNING_COMMANDS, *COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(commands))
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in commands:
        raise SystemExit(f"unknown command {command!r}; choose one of: {', '.join(commands)}")
    from specforge_lightning.callbacks import CheckpointError, ResumeMismatchError

    try:
        run_lightning([command, *rest]) if command in LIGHTNING_COMMANDS else COMMANDS[command](rest)
    except (CheckpointError, ResumeMismatchError) as e:
        # Refusals are answers, not crashes: print the reason without a traceback.
        raise SystemExit(f"error: {e}") from None
