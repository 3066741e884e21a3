"""The fused LM-head path equals the plain path (lm_head -> soft_outputs) in values and gradients."""

from __future__ import annotations

import pytest
import torch

from sqlm import fused as fused_module
from sqlm.errors import SqlmError
from sqlm.forward import model_log_pi, model_values, policy_soft_outputs
from sqlm.fused import (
    LMHead,
    decoder_forward,
    fused_log_probs,
    fused_soft_outputs,
    fused_values,
    lm_head_of,
    supports_fused_head,
)
from sqlm.soft import soft_outputs
from sqlm.tiny import tiny_causal_lm


TAU = 0.7
ATOL = 1e-5


def _plain_logits(h, head: LMHead):
    z = torch.nn.functional.linear(h, head.weight, head.bias) * head.scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


def _objective(out, w1, w2, w3):
    """A scalar that weighs every output differently, so every gradient path is checked."""
    return (out.q * w1).sum() + (out.v * w2).sum() + (out.log_pi * w3).sum()


def _batch(ids, attn=None, start=0, path_mask=None):
    """A packed batch as ``sqlm.forward`` reads it (states ``start .. L-2``)."""
    batch = {"input_ids": ids, "attention_mask": attn, "logits_start": start}
    if path_mask is not None:
        batch["path_mask"] = path_mask
    return batch


def model_soft_outputs(model, ids, attn, tau):
    return policy_soft_outputs(model, _batch(ids, attn), tau, with_entropy=False)[0]


def _leaves(b=3, t=7, h=16, v=50, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    b_ = torch.randn(v, generator=g).requires_grad_() if bias else None
    actions = torch.randint(0, v, (b, t), generator=g)
    ws = [torch.randn(b, t, generator=g) for _ in range(3)]
    return hidden, weight, b_, actions, ws


def _grads(*xs):
    out = [None if x is None else x.grad.clone() for x in xs]
    for x in xs:
        if x is not None:
            x.grad = None
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.5, None), (1.0, 3.0), (2.0, 5.0)])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_fused_equals_plain_values_and_gradients(bias, scale, softcap, chunk_size):
    hidden, weight, b, actions, ws = _leaves(bias=bias)
    head = LMHead(weight, b, scale, softcap)
    plain = soft_outputs(_plain_logits(hidden, head), actions, TAU)
    _objective(plain, *ws).backward()
    g_plain = _grads(hidden, weight, b)

    fused = fused_soft_outputs(hidden, head, actions, TAU, chunk_size=chunk_size)
    _objective(fused, *ws).backward()
    g_fused = _grads(hidden, weight, b)

    for name in ("q", "v", "log_pi"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), atol=ATOL, rtol=0)
    for gp, gf in zip(g_plain, g_fused):
        if gp is not None:
            torch.testing.assert_close(gf, gp, atol=ATOL, rtol=1e-5)


def test_mask_computes_only_path_rows_and_zeroes_the_rest():
    hidden, weight, _, actions, ws = _leaves()
    head = LMHead(weight)
    mask = torch.zeros(3, 7)
    mask[0, 2:] = 1
    mask[1, :4] = 1  # row 2 has no path step at all
    plain = soft_outputs(_plain_logits(hidden, head), actions, TAU)
    _objective(plain, *(w * mask for w in ws)).backward()
    g_plain = _grads(hidden, weight)
    fused = fused_soft_outputs(hidden, head, actions, TAU, mask=mask, chunk_size=3)
    _objective(fused, *ws).backward()  # unmasked weights: outputs off the mask are exactly 0
    g_fused = _grads(hidden, weight)
    for name in ("q", "v", "log_pi"):
        got, want = getattr(fused, name), getattr(plain, name)
        torch.testing.assert_close(got * mask, want * mask, atol=ATOL, rtol=0)
        assert torch.all(got[mask == 0] == 0)
    for gp, gf in zip(g_plain, g_fused):
        torch.testing.assert_close(gf, gp, atol=ATOL, rtol=1e-5)


def test_entropy_and_negative_action_ids():
    hidden, weight, _, actions, _ = _leaves()
    actions[0, 0] = -100
    head = LMHead(weight, None, 1.0, 4.0)
    plain = soft_outputs(_plain_logits(hidden, head), actions, TAU, with_entropy=True)
    fused = fused_soft_outputs(hidden, head, actions, TAU, with_entropy=True, chunk_size=5)
    torch.testing.assert_close(fused.entropy, plain.entropy, atol=ATOL, rtol=0)
    torch.testing.assert_close(fused.q, plain.q, atol=ATOL, rtol=0)
    assert fused.entropy.grad_fn is None


def test_no_grad_variants_equal_plain_and_keep_no_graph():
    hidden, weight, b, actions, _ = _leaves(bias=True)
    head = LMHead(weight, b, 1.5, 6.0)
    with torch.no_grad():
        plain = soft_outputs(_plain_logits(hidden, head), actions, TAU)
    mask = torch.ones(3, 7)
    mask[:, :2] = 0
    v = fused_values(hidden, head, TAU, mask=mask, chunk_size=2)
    lp = fused_log_probs(hidden, head, actions, chunk_size=2)
    assert v.grad_fn is None and not v.requires_grad  # inputs require grad, outputs do not
    assert lp.grad_fn is None
    torch.testing.assert_close(v, plain.v * mask, atol=ATOL, rtol=0)
    torch.testing.assert_close(lp, plain.log_pi, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_model_path_equals_model_logits_with_all_parameter_gradients(tied, monkeypatch):
    monkeypatch.setattr(fused_module, "_ELEMENTS_CPU", 5 * 64)  # chunks of 5 rows
    model = tiny_causal_lm(64, seed=1, hidden_size=16, tie_word_embeddings=tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    attn = torch.ones_like(ids)
    attn[1, -2:] = 0  # right padding
    ws = [torch.randn(2, 8, generator=torch.Generator().manual_seed(k)) for k in range(3)]

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    _objective(soft_outputs(logits, ids[:, 1:], TAU), *ws).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    assert supports_fused_head(model)
    out = model_soft_outputs(model, ids, attn, TAU)
    _objective(out, *ws).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")

    with torch.no_grad():
        ref = soft_outputs(logits, ids[:, 1:], TAU)
    torch.testing.assert_close(out.v, ref.v, atol=ATOL, rtol=0)
    torch.testing.assert_close(model_values(model, _batch(ids, attn), TAU), ref.v, atol=ATOL, rtol=0)
    torch.testing.assert_close(model_log_pi(model, _batch(ids, attn)), ref.log_pi, atol=ATOL, rtol=0)


def test_softcap_family_is_read_from_the_config():
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=2.0,
        max_position_embeddings=32,
    )
    model = AutoModelForCausalLM.from_config(config)
    head = lm_head_of(model)
    assert head.softcap == 2.0 and head.scale == 1.0
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        assert logits.abs().max() <= 2.0
        plain = soft_outputs(logits, ids[:, 1:], TAU)
        fused = model_soft_outputs(model, ids, None, TAU)
    torch.testing.assert_close(fused.v, plain.v, atol=ATOL, rtol=0)
    torch.testing.assert_close(fused.log_pi, plain.log_pi, atol=ATOL, rtol=0)


def test_peft_model_equals_plain_and_lora_head_is_refused():
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm(64, seed=4, hidden_size=16)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        plain = soft_outputs(peft_model(input_ids=ids).logits[:, :-1], ids[:, 1:], TAU)
        fused = model_soft_outputs(peft_model, ids, None, TAU)
    torch.testing.assert_close(fused.q, plain.q, atol=ATOL, rtol=0)

    head_lora = get_peft_model(
        tiny_causal_lm(64, seed=4, hidden_size=16, tie_word_embeddings=False),
        LoraConfig(r=2, target_modules=["lm_head"]),
    )
    with pytest.raises(SqlmError, match="lm_head"):
        lm_head_of(head_lora)
    assert supports_fused_head(peft_model) and not supports_fused_head(head_lora)


def test_decoder_forward_goes_through_the_models_own_forward():
    model = tiny_causal_lm(64, seed=6, hidden_size=16)
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(out.logits.shape))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(7))
    out, h = decoder_forward(model, ids, None, output_hidden_states=True)
    assert seen == [(2, 1, 64)]  # the model's hooks ran, with logits of the last position only
    torch.testing.assert_close(h, out.hidden_states[-1])
    torch.testing.assert_close(h, model.model(input_ids=ids).last_hidden_state)


def test_bf16_hidden_states_match_plain_bf16_path():
    hidden, weight, _, actions, ws = _leaves(h=32, v=100)
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    plain = soft_outputs(hb @ wb.t(), actions, TAU)
    fused = fused_soft_outputs(hb, LMHead(wb), actions, TAU, chunk_size=4)
    assert fused.v.dtype == torch.float32
    torch.testing.assert_close(fused.v, plain.v, atol=1e-5, rtol=0)  # same bf16 logits, fp32 logsumexp
    _objective(fused, *ws).backward()
    assert wb.grad.dtype == torch.bfloat16 and hb.grad.dtype == torch.bfloat16


def test_bad_shapes_name_the_argument():
    hidden, weight, _, actions, _ = _leaves()
    with pytest.raises(ValueError, match="hidden"):
        fused_soft_outputs(hidden[0], LMHead(weight), actions, TAU)
    with pytest.raises(ValueError, match="head.weight"):
        fused_soft_outputs(hidden, LMHead(weight[:, :3]), actions, TAU)
    with pytest.raises(ValueError, match="actions"):
        fused_soft_outputs(hidden, LMHead(weight), actions[:, :3], TAU)
    with pytest.raises(ValueError, match="mask"):
        fused_values(hidden, LMHead(weight), TAU, mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="tau"):
        fused_values(hidden, LMHead(weight), 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_values(hidden, LMHead(weight), TAU, chunk_size=0)


def test_forward_reads_a_packed_batch_the_same_through_the_fused_head_and_the_plain_logits():
    """``sqlm.forward`` takes the fused path for a plain head and the logits for a LoRA head; on the
    path steps of a batch with a prompt (``logits_start > 0``) both give the same readings."""
    from peft import LoraConfig, get_peft_model

    plain_model = get_peft_model(
        tiny_causal_lm(64, seed=8, hidden_size=16, tie_word_embeddings=False),
        LoraConfig(r=2, target_modules=["lm_head"]),
    )  # LoRA B = 0: same function
    fused_model = tiny_causal_lm(64, seed=8, hidden_size=16, tie_word_embeddings=False)
    assert supports_fused_head(fused_model) and not supports_fused_head(plain_model)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(9))
    attn = torch.ones_like(ids)
    attn[2, -3:] = 0
    path = torch.zeros(3, 8)
    path[:, 2:] = 1
    path[2, -3:] = 0
    batch = _batch(ids, attn, start=2, path_mask=path)
    on = path[:, 2:].bool()

    got = {}
    for name, model in (("fused", fused_model), ("plain", plain_model)):
        soft, _ = policy_soft_outputs(model, batch, TAU)
        log_pi, lse = model_log_pi(model, batch, return_lse=True)
        got[name] = [soft.q, soft.v, soft.log_pi, soft.entropy, log_pi, lse, model_values(model, batch, TAU)]
        assert all(x.shape == (3, 6) for x in got[name])
    for f, p in zip(got["fused"], got["plain"]):
        torch.testing.assert_close(f[on], p[on], atol=ATOL, rtol=0)
    torch.testing.assert_close(got["plain"][6], TAU * got["plain"][5])  # V = tau logsumexp z
