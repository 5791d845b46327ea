"""Export: SGLang folder fields and names, hf folder reloads bit-identically, clear errors on foreign files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from specforge_lightning import cli
from specforge_lightning.algorithms.eagle3 import Eagle3Module
from specforge_lightning.algorithms.eagle3.model import Eagle3Cache
from specforge_lightning.contracts import FeatureContext
from specforge_lightning.data.vocab import build_vocab_mapping, save_vocab_mapping
from specforge_lightning.algorithms.base import DraftLoadError, LoadOptions
from specforge_lightning.algorithms.eagle3.export import REQUIRED_TENSORS
from specforge_lightning.export import drafts
from specforge_lightning.target.zoo import TINY_LLAMA, resolve_target

AUX = (1, 3, 4)  # eagle3_layer_ids(8) for the 8-layer tiny-llama
V, VD, H = 512, 128, 64


def make_checkpoint(root: Path) -> tuple[Path, FeatureContext]:
    """An Eagle3Module against the ``tiny-llama`` zoo target, fitted one step by a real Trainer, saved."""
    root.mkdir(parents=True, exist_ok=True)
    d2t, t2d = build_vocab_mapping(Counter({t: 1 for t in range(100, 100 + VD // 2)}), V, VD)  # a non-trivial d2t
    save_vocab_mapping(root / "vocab.safetensors", d2t, t2d)
    context = FeatureContext(
        target_dir=str(resolve_target(TINY_LLAMA)), target_id=TINY_LLAMA, layer_ids=AUX, hidden_size=H,
        vocab_size=V, draft_vocab_size=VD, vocab_mapping_path=str(root / "vocab.safetensors"),
        capture_dtype="float32", max_length=64, manifest={"corpus": "sharegpt", "num_samples": 24},
    )
    module = Eagle3Module(ttt_length=2, lr=1e-3)
    module.build(context)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, V, (2, 16), generator=g),
        "loss_mask": torch.ones(2, 16, dtype=torch.long),
        "aux_hidden_states": torch.randn(2, 16, 3 * H, generator=g),
        "last_hidden_state": torch.randn(2, 16, H, generator=g),
    }
    return save_fitted(module, batch, root), context


def save_fitted(module: L.LightningModule, batch: dict[str, torch.Tensor], root: Path) -> Path:
    """``root/draft.ckpt``: ``module`` fitted one step on ``batch`` by a real CPU Trainer, as ``fit`` saves it."""
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root),
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    path = root / "draft.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, FeatureContext]:
    return make_checkpoint(tmp_path_factory.mktemp("eagle3_ckpt"))



def load_draft(path, target_dir=None, trusted=False):
    """The generic reader ``evaluate``/``export`` use (any registered algorithm)."""
    return drafts.load_draft(path, LoadOptions(target_dir=target_dir, trusted=trusted))[1]


load_checkpoint = load_exported = load_draft

def draft_outputs(draft) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (1, 6), generator=g)
    aux = torch.randn(1, 6, 3 * H, generator=g)
    logits, hidden, _ = draft.draft_step(ids, aux, torch.arange(6)[None], Eagle3Cache())
    return logits, hidden


def test_checkpoint_loads_like_the_module(ckpt):
    path, context = ckpt
    loaded = load_checkpoint(path)
    module = Eagle3Module.load_from_checkpoint(path, map_location="cpu")
    ref = module.draft.state_dict()
    assert set(loaded.draft.state_dict()) == set(ref)
    for name, t in loaded.draft.state_dict().items():
        assert torch.equal(t, ref[name]), name
    assert torch.equal(loaded.draft.embed_tokens.weight, module.draft.embed_tokens.weight.float())
    assert loaded.layer_ids == AUX and loaded.context["target_id"] == TINY_LLAMA
    assert loaded.context["manifest"] == {"corpus": "sharegpt", "num_samples": 24}
    assert not torch.equal(loaded.draft.d2t, torch.zeros_like(loaded.draft.d2t))  # the real mapping came back


def test_sglang_export_config_and_tensor_names(ckpt, tmp_path):
    path, _ = ckpt
    out = tmp_path / "sglang"
    # float32 explicitly: the sglang default is bf16 (issue 18); this test checks names and a bit-exact reload
    cli.main(["export", "--ckpt_path", str(path), "--format", "sglang", "--output_dir", str(out), "--dtype", "float32"])
    cfg = json.loads((out / "config.json").read_text())
    target_cfg = json.loads((resolve_target(TINY_LLAMA) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is False  # the target ties its embeddings; the draft must not
    assert (cfg["vocab_size"], cfg["draft_vocab_size"], cfg["num_hidden_layers"]) == (V, VD, 1)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rms_norm_eps"):
        assert cfg[key] == target_cfg[key], key
    assert cfg["head_dim"] == H // target_cfg["num_attention_heads"] and cfg["target_hidden_size"] == H
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": list(AUX)}
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == set(REQUIRED_TENSORS)  # no embedding: SGLang takes the target's
    assert tensors["fc.weight"].shape == (H, 3 * H) and tensors["fc.weight"].dtype == torch.float32
    assert tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * H
    assert tensors["lm_head.weight"].shape == (VD, H)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert torch.equal(torch.nonzero(tensors["t2d"]).flatten(), tensors["d2t"] + torch.arange(VD))
    assert cfg["torch_dtype"] == "float32"

    # An SGLang folder reloads too (embedding from the target) and computes the same thing.
    again = load_exported(out, target_dir=str(resolve_target(TINY_LLAMA)))
    ref = load_checkpoint(path).draft
    for a, b in zip(draft_outputs(again.draft), draft_outputs(ref)):
        assert torch.equal(a, b)


def test_sglang_export_bfloat16(ckpt, tmp_path):
    out = tmp_path / "bf16"
    cli.main(["export", "--ckpt_path", str(ckpt[0]), "--format", "sglang", "--output_dir", str(out), "--dtype", "bfloat16"])
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["fc.weight"].dtype == torch.bfloat16 and tensors["norm.weight"].dtype == torch.bfloat16
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_hf_export_reloads_bit_identical(ckpt, tmp_path):
    path, _ = ckpt
    out = tmp_path / "hf"
    cli.main(["export", "--ckpt_path", str(path), "--format", "hf", "--output_dir", str(out)])
    original = load_checkpoint(path)
    reloaded = load_draft(out, target_dir=None)  # self-contained: no target needed
    assert reloaded.kind == "hf" and reloaded.has_embedding and reloaded.draft.config == original.draft.config
    a, b = original.draft.export_state_dict(), reloaded.draft.export_state_dict()
    assert set(a) == set(b) and "embed_tokens.weight" in b
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for x, y in zip(draft_outputs(original.draft), draft_outputs(reloaded.draft)):
        assert torch.equal(x, y)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["feature_context"]["layer_ids"] == list(AUX) and cfg["feature_context"]["target_id"] == TINY_LLAMA
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]  # also servable by SGLang


def test_foreign_and_corrupt_checkpoints_name_the_file(ckpt, tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    other = tmp_path / "dflash.ckpt"  # another algorithm's Lightning checkpoint
    torch.save({"state_dict": {"draft.layers.0.weight": torch.zeros(2)}, "dflash": {"format": 1},
                "pytorch-lightning_version": "2.6.6"}, other)
    weights = tmp_path / "weights.ckpt"  # a safetensors file under a checkpoint name
    save_file({"x": torch.zeros(2)}, str(weights))
    missing = tmp_path / "nope.ckpt"
    for bad, words in [(garbage, "cannot be read"), (other, "cannot rebuild the dflash draft"), (weights, "cannot be read"),
                       (missing, "no such")]:
        with pytest.raises(DraftLoadError, match=words) as err:
            load_draft(bad)
        assert str(bad) in str(err.value)
        with pytest.raises(SystemExit) as exit_:
            cli.main(["export", "--ckpt_path", str(bad), "--format", "sglang", "--output_dir", str(tmp_path / "x")])
        printed = capsys.readouterr().err
        assert exit_.value.code == 2 and printed.startswith("error: export: ") and str(bad) in printed
    assert "dflash" in str(pytest.raises(DraftLoadError, load_draft, other).value)
    assert not (tmp_path / "x").exists()


def test_mismatched_weights_and_bad_folder_are_refused(ckpt, tmp_path):
    ck = torch.load(ckpt[0], map_location="cpu", weights_only=True)
    ck["eagle3"]["draft_config"]["intermediate_size"] += 8  # config no longer fits the weights
    bad = tmp_path / "mismatch.ckpt"
    torch.save(ck, bad)
    with pytest.raises(DraftLoadError, match="do not fit") as err:
        load_draft(bad)
    assert str(bad) in str(err.value)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(DraftLoadError, match="no export of a registered algorithm") as err:
        load_draft(folder)
    assert str(folder) in str(err.value)


class CustomHparam:
    """Stands for any non-tensor object a user's checkpoint might pickle (a config dataclass, say)."""


def test_checkpoint_with_pickled_objects_needs_trust(ckpt, tmp_path):
    ck = torch.load(ckpt[0], map_location="cpu", weights_only=True)
    ck["hyper_parameters"]["custom"] = CustomHparam()
    path = tmp_path / "custom.ckpt"
    torch.save(ck, path)
    with pytest.raises(DraftLoadError, match="--trust_checkpoint") as err:
        load_draft(path)
    assert str(path) in str(err.value)
    loaded = load_draft(path, trusted=True)
    assert torch.equal(loaded.draft.fc.weight, load_checkpoint(ckpt[0]).draft.fc.weight)


def test_export_refuses_a_folder_that_holds_files_unless_overwrite(ckpt, tmp_path, capsys):
    import hashlib

    path, _ = ckpt
    out = tmp_path / "sglang"
    cli.main(["export", "--ckpt_path", str(path), "--format", "sglang", "--output_dir", str(out)])
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        cli.main(["export", "--ckpt_path", str(path), "--format", "sglang", "--output_dir", str(out), "--dtype", "bfloat16"])
    printed = capsys.readouterr().err
    assert err.value.code == 2 and str(out) in printed and "--overwrite" in printed and "config.json" in printed
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before  # nothing lost
    cli.main(["export", "--ckpt_path", str(path), "--format", "sglang", "--output_dir", str(out), "--dtype", "bfloat16",
              "--overwrite"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
