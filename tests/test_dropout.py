"""The CPU dropout drawn from random bits: its rate, scale and gradient, and the model it goes into."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import bert_mlm.dropout as bitmask
from bert_mlm.dropout import bitmask_dropout, use_bitmask_dropout


def test_drops_at_rate_p_scales_the_rest_and_passes_the_gradient_through_the_same_mask():
    torch.manual_seed(0)
    x = torch.ones(1_000_003, requires_grad=True)  # not a multiple of the 4 elements per draw
    y = bitmask_dropout(x, 0.1, training=True)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=2e-3)  # ~7 standard deviations
    dropped = round(0.1 * 32768)
    assert torch.all(y[kept] == 32768 / (32768 - dropped))  # the scale of the rate actually used
    assert y.mean().item() == pytest.approx(1.0, abs=3e-3)
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, 2 * y.detach())

    torch.manual_seed(0)
    assert torch.equal(bitmask_dropout(x, 0.1, training=True), y)  # the seed decides the mask
    assert bitmask_dropout(x, 0.1, training=False) is x and bitmask_dropout(x, 0.0, training=True) is x
    half = bitmask_dropout(torch.ones(100_000), 0.5, training=True)
    assert (half == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)  # all 16-bit words uniform


def tiny_bert(attention_dropout: float) -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=attention_dropout)
    model = BertForMaskedLM(config)
    model.set_attn_implementation("eager")
    return model


def test_swapped_in_model_computes_what_transformers_eager_attention_does(monkeypatch):
    """Unchanged outputs in eval mode, padding included (the mask must reach the new
    attention), and in training the attention probabilities take the new dropout."""
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(3, 10, dtype=torch.long)
    padding[0, 6:] = 0
    hf, ours = tiny_bert(0.5).eval(), tiny_bert(0.5).eval()
    use_bitmask_dropout(ours, attention=True)
    assert not ours.training and not any(m.training for m in ours.modules())
    for mask in (padding, None):
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   hf(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)

    masks, keep_mask = [], bitmask._keep_mask
    monkeypatch.setattr(bitmask, "_keep_mask", lambda x, p: masks.append(x.shape) or keep_mask(x, p))
    ours.train()
    assert not torch.equal(ours(input_ids=ids).logits, hf(input_ids=ids).logits)
    assert masks == [(3, 4, 10, 10)] * 2  # (B, heads, T, T) in each layer; no hidden dropout
