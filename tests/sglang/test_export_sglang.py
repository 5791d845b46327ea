"""``export --format sglang`` for every algorithm, in the main venv: dtype, layer order, fields, refusals, serve hint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from specforge_lightning.algorithms.base import LoadedDraft
from specforge_lightning.algorithms.dflash.sglang import export_sglang as export_block, sglang_serve_hint
from specforge_lightning.algorithms.eagle3.export import export_sglang as export_eagle3, sglang_serve_hint as eagle3_hint
from specforge_lightning.errors import UserError
from specforge_lightning.export.command import main as export_main
from tests.sglang import drafts


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return drafts.target(tmp_path_factory.mktemp("target"))


def test_eagle3_sglang_is_bf16_sorted_and_has_the_vllm_key(target, tmp_path):
    folder, cfg, weights = target
    draft = drafts.eagle3(cfg, weights)
    out = export_eagle3(draft, tmp_path / "e3", None, {"target_dir": str(folder), "ttt_length": 2})
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    assert config["torch_dtype"] == "bfloat16" and tensors["fc.weight"].dtype == torch.bfloat16
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    H = cfg["hidden_size"]
    fc = draft.fc.weight.to(torch.bfloat16)
    assert torch.equal(tensors["fc.weight"][:, :H], fc[:, H : 2 * H])  # layer 1 was second in (3, 1, 2)
    assert "embed_tokens.weight" not in tensors and tensors["d2t"].dtype == torch.long
    loaded = LoadedDraft("eagle3", draft, "x", "checkpoint", (1, 2, 3), H, 48, 32)
    hint = eagle3_hint(loaded, out)
    assert "--speculative-num-steps 2 " in hint and "--speculative-num-draft-tokens 3 " in hint
    assert "--dtype bfloat16" in hint


@pytest.mark.parametrize("ids,match", [
    ((1, 1, 2), r"layer ids \[1, 1, 2\] repeat \[1\]"),
    ((1, 2, 5), r"layer id 5 cannot be captured by SGLang: the target has 6 layers"),
])
def test_eagle3_refuses_layer_ids_sglang_cannot_capture(target, tmp_path, ids, match):
    folder, cfg, weights = target
    with pytest.raises(ValueError, match=match):
        export_eagle3(drafts.eagle3(cfg, weights, ids), tmp_path / "x", None, {"target_dir": str(folder)})
    assert not (tmp_path / "x" / "config.json").exists()


@pytest.mark.parametrize("domino", [False, True])
def test_block_sglang_folder_fields(target, tmp_path, domino):
    folder, cfg, weights = target
    name = "domino" if domino else "dflash"
    out = export_block(drafts.block(cfg, weights, domino), tmp_path / name, name, {"target_dir": str(folder)})
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["num_target_layers"] == cfg["num_hidden_layers"] == 6  # the target's depth, not len(ids)
    assert config["dflash_config"]["target_layer_ids"] == [1, 4]
    assert config["torch_dtype"] == "bfloat16" and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert not {"embed_tokens.weight", "lm_head.weight"} & set(tensors)
    assert "layers.0.self_attn.q_norm.weight" in tensors
    if domino:
        assert config["dflash_config"]["projector_type"] == "domino"
        assert config["dflash_config"]["pure_draft_prefix_len"] == 1
        assert {"prefix_gru.weight_ih_l0", "embed_proj.0.weight", "embed_proj.2.weight"} <= set(tensors)
    hint = sglang_serve_hint(out)
    assert "--speculative-algorithm DFLASH" in hint and "--speculative-num-draft-tokens 4 " in hint
    assert "--dtype bfloat16" in hint


def test_block_refuses_a_draft_without_qk_norms(target, tmp_path):
    folder, cfg, weights = target
    with pytest.raises(ValueError, match="trained without per-head q/k norms .* always applies them"):
        export_block(drafts.block(cfg, weights, False, qk_norm=False), tmp_path / "x", "dflash",
                     {"target_dir": str(folder)})


def test_block_refuses_the_last_layer(target, tmp_path):
    folder, cfg, weights = target
    with pytest.raises(ValueError, match="layer id 5 cannot be captured by SGLang"):
        export_block(drafts.block(cfg, weights, False, ids=(1, 5)), tmp_path / "x", "dflash", {"target_dir": str(folder)})


def test_export_refuses_an_sglang_block_folder_no_algorithm_owns(target, tmp_path):
    folder, cfg, weights = target
    out = export_block(drafts.block(cfg, weights, False), tmp_path / "d", "dflash", {"target_dir": str(folder)})
    with pytest.raises((SystemExit, UserError), match="describes no export of a registered algorithm"):
        export_main(["--ckpt_path", str(out), "--format", "sglang", "--output_dir", str(tmp_path / "again")])
