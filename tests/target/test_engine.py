import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specforge_lightning.contracts import PromptTask
from specforge_lightning.target.engine import HFTargetEngine


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def test_capture_matches_hidden_states_and_strips_padding():
    model = _tiny_model()
    engine = HFTargetEngine(model, capture_dtype=torch.float32)
    tasks = [
        PromptTask("a", tuple(range(3, 13)), (0,) * 5 + (1,) * 5),
        PromptTask("b", tuple(range(20, 26)), (0, 0, 1, 1, 1, 1)),
    ]
    feats = engine.capture(tasks, [1, 2, 4])
    for task, f in zip(tasks, feats):
        ids = torch.tensor([task.input_ids])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        hs = out.hidden_states
        want_aux = torch.cat([hs[2], hs[3], hs[5]], dim=-1)[0]
        assert f["aux_hidden_states"].shape == (task.num_tokens, 3 * 32)
        torch.testing.assert_close(f["aux_hidden_states"], want_aux, atol=1e-5, rtol=1e-5)
        # The final post-norm hidden is what lm_head reads: its logits equal the model's.
        torch.testing.assert_close(model.lm_head(f["last_hidden_state"]), out.logits[0], atol=1e-4, rtol=1e-4)
        assert f["input_ids"].tolist() == list(task.input_ids)
        assert f["loss_mask"].tolist() == list(task.loss_mask)
        # The target's greedy token where the previous position is supervised (a teacher), -1 elsewhere.
        after = [i >= 1 and task.loss_mask[i - 1] == 1 for i in range(task.num_tokens)]
        want_top1 = torch.where(torch.tensor(after), out.logits[0].argmax(-1), torch.tensor(-1))
        assert f["target_top1"].dtype == torch.long
        assert f["target_top1"].tolist() == want_top1.tolist()


def test_capture_dtype_is_applied():
    engine = HFTargetEngine(_tiny_model(), capture_dtype=torch.bfloat16)
    (f,) = engine.capture([PromptTask("a", (1, 2, 3), (0, 1, 1))], [0, 1, 2])
    assert f["aux_hidden_states"].dtype == torch.bfloat16
    assert f["input_ids"].dtype == torch.long
