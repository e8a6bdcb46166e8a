import pytest
import torch
import torch.nn.functional as F

from bert_mlm.loss import summed_cross_entropy

V = 30522  # BERT's vocabulary: 34 rows a chunk on the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_eager_cross_entropy_over_several_chunks(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(100, V, generator=g)).to(dtype)  # 100 rows: 3 chunks, the last one short
    targets = torch.randint(0, V, (100,), generator=g)
    ours_in = logits.clone().requires_grad_()
    eager_in = logits.clone().requires_grad_()
    ours = summed_cross_entropy(ours_in, targets)
    eager = F.cross_entropy(eager_in.float(), targets, reduction="sum")
    (0.5 * ours).backward()  # a scale, so the incoming gradient is applied
    (0.5 * eager).backward()
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(eager.item(), rel=1e-6)
    assert ours_in.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of the gradient either way
    torch.testing.assert_close(ours_in.grad.float(), eager_in.grad.float(), rtol=0, atol=tol)


def test_under_autocast_and_without_gradient():
    logits = torch.randn(7, 50, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (7,))
    expected = F.cross_entropy(logits.float(), targets, reduction="sum")
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        assert summed_cross_entropy(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_no_rows_gives_zero_and_an_empty_gradient():
    logits = torch.zeros(0, V, requires_grad=True)
    loss = summed_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and logits.grad.shape == (0, V)


def test_with_bf16_as_the_default_dtype():
    # Lightning's trainer.precision=bf16-true makes bf16 the default dtype while a step runs.
    logits = torch.randn(7, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    expected = F.cross_entropy(logits.float(), targets, reduction="sum")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        loss = summed_cross_entropy(logits, targets)
        loss.backward()
    finally:
        torch.set_default_dtype(default)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and logits.grad.dtype == torch.bfloat16


def test_a_second_backward_through_the_loss_is_refused_not_wrong():
    """The backward scales the gradient it saved in place: autograd must refuse to reuse it."""
    logits = torch.randn(5, 11, requires_grad=True)
    loss = summed_cross_entropy(logits, torch.randint(11, (5,))) * 2
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
