"""Our SGLang exports, loaded and run by SGLang's OWN draft classes (in the side venv .venv-sglang).

``bash scripts/setup-sglang.sh`` builds the side venv. Without it the module is skipped, except
under ``CI=true``, where a missing side venv fails. One subprocess (``sglang_side.py``) parses
each exported folder with SGLang's config code, builds ``LlamaForCausalLMEagle3`` /
``DFlashDraftModel`` on CPU, runs its ``load_weights`` and one forward on fixed inputs; here the
same inputs go through our modules and the outputs are compared in fp32 (atol/rtol ``TOL``).
The attention kernel on the SGLang side is a reference softmax (see ``sglang_side.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specforge_lightning.algorithms.dflash.drafter import BlockDrafter
from specforge_lightning.algorithms.dflash.sglang import export_sglang as export_block
from specforge_lightning.algorithms.domino.drafter import DominoBlockDrafter
from specforge_lightning.algorithms.eagle3.export import export_sglang as export_eagle3
from specforge_lightning.algorithms.eagle3.model import Eagle3Cache
from tests.sglang import drafts

ROOT = Path(__file__).resolve().parents[2]
SIDE_PYTHON = ROOT / ".venv-sglang" / "bin" / "python"
STUB_DIR = ROOT / ".venv-sglang" / "lib" / "stub"
TOL = 1e-4  # fp32 on both sides; SGLang's RMSNorm / rotary / SiluAndMul CPU paths differ from ours in op order only
T, ANCHOR = 10, 6

if not SIDE_PYTHON.exists():
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{SIDE_PYTHON} is missing under CI=true: run bash scripts/setup-sglang.sh", pytrace=False)
    pytest.skip("no side venv .venv-sglang (bash scripts/setup-sglang.sh)", allow_module_level=True)


def side_env() -> dict[str, str]:
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    real = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    if "libcuda.so.1" not in real:  # a CPU machine: sgl_kernel still links the driver library
        env["LD_LIBRARY_PATH"] = f"{STUB_DIR}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def layer_inputs(ids: tuple[int, ...], sorted_ids: list[int], H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer target states, concatenated in the draft's order (ours) and in SGLang's capture order."""
    g = torch.Generator().manual_seed(7)
    per_layer = {i: torch.randn(T, H, generator=g) for i in sorted(ids)}
    return torch.cat([per_layer[i] for i in ids], -1), torch.cat([per_layer[i] for i in sorted_ids], -1)


@pytest.fixture(scope="module")
def conformance(tmp_path_factory):
    """Export one draft per algorithm (fp32, for the comparison), run SGLang's side once, return both sides."""
    root = tmp_path_factory.mktemp("sglang")
    target_dir, cfg, weights = drafts.target(root / "target")
    context = {"target_dir": str(target_dir), "ttt_length": 2}
    ids = torch.randint(0, cfg["vocab_size"], (T,), generator=torch.Generator().manual_seed(5))
    models = {
        "eagle3": drafts.eagle3(cfg, weights),
        "dflash": drafts.block(cfg, weights, domino=False),
        "domino": drafts.block(cfg, weights, domino=True),
    }
    cases, ours = [], {}
    for name, draft in models.items():
        folder = root / name
        if name == "eagle3":
            export_eagle3(draft, folder, torch.float32, context)
            layer_ids = draft.config.aux_layer_ids
            saved = json.loads((folder / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"]
        else:
            export_block(draft, folder, name, context, torch.float32)
            layer_ids = draft.config.target_layer_ids
            saved = json.loads((folder / "config.json").read_text())["dflash_config"]["target_layer_ids"]
        aux, aux_sorted = layer_inputs(layer_ids, saved, cfg["hidden_size"])
        inputs = {"input_ids": ids, "aux_sorted": aux_sorted, "anchor": torch.tensor(ANCHOR),
                  "target_embedding": weights["model.embed_tokens.weight"], "target_head": weights["lm_head.weight"]}
        save_file(inputs, str(root / f"{name}.inputs.safetensors"))
        cases.append({"name": name, "algorithm": name, "folder": str(folder),
                      "inputs": str(root / f"{name}.inputs.safetensors")})
        ours[name] = our_outputs(name, draft, ids, aux)
    (root / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [str(SIDE_PYTHON), str(Path(__file__).with_name("sglang_side.py")), str(root / "cases.json"),
         str(root / "sglang.safetensors")],
        capture_output=True, text=True, env=side_env(), timeout=600, cwd=str(root),
    )
    report_line = [line for line in proc.stdout.splitlines() if line.startswith("SGLANG_REPORT ")]
    assert proc.returncode == 0 and report_line, f"SGLang side failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(report_line[0].removeprefix("SGLANG_REPORT "))
    theirs = load_file(str(root / "sglang.safetensors"))
    return report, ours, {k: {n.split(".", 1)[1]: v for n, v in theirs.items() if n.startswith(k + ".")} for k in models}


@torch.no_grad()
def our_outputs(name: str, draft, ids: torch.Tensor, aux: torch.Tensor) -> dict[str, torch.Tensor]:
    if name == "eagle3":
        logits, hidden, _ = draft.draft_step(ids[None], aux[None], torch.arange(T)[None], Eagle3Cache())
        return {"logits": logits[0], "prenorm": hidden[0], "normed": draft.norm(hidden)[0],
                "hot_token_id": draft.d2t + torch.arange(draft.config.draft_vocab_size)}
    h = draft(ids[None], aux[None], torch.tensor([[ANCHOR]]), torch.tensor([[True]]))[0, 0]  # (bs, H) pre-norm
    out = {"normed": draft.norm(h), "logits": draft.logits(h)}
    if name == "domino":
        bs = draft.config.block_size
        out["proposals"] = torch.tensor(DominoBlockDrafter(draft).decode(h, int(ids[ANCHOR]), bs - 1))
    else:
        assert isinstance(BlockDrafter(draft), BlockDrafter)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("name", ["eagle3", "dflash", "domino"])
def test_sglang_builds_loads_and_matches_our_forward(conformance, name):
    report, ours, theirs = conformance
    assert report[name] == "ok", f"SGLang could not run the {name} export: {report[name]}"
    mine, sgl = ours[name], theirs[name]
    diffs = {k: max_diff(mine[k], sgl[k]) for k in ("normed", "logits")}
    print(f"{name}: max |SGLang - ours| {diffs}")
    for k in ("normed", "logits"):
        torch.testing.assert_close(sgl[k], mine[k].to(sgl[k].dtype), atol=TOL, rtol=TOL, msg=f"{name} {k}: {diffs}")
    if name == "eagle3":
        torch.testing.assert_close(sgl["prenorm"], mine["prenorm"], atol=TOL, rtol=TOL)
        assert torch.equal(sgl["hot_token_id"], mine["hot_token_id"])  # SGLang reads d2t as offsets
        assert int(sgl["fc_in"]) == 3 * mine["normed"].shape[-1]
    else:
        assert int(sgl["block_size"]) == 4
        assert sgl["target_layer_ids"].tolist() == sorted(drafts.BLOCK_IDS)
    if name == "domino":
        assert sgl["proposals"].tolist() == mine["proposals"].tolist()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
