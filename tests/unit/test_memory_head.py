"""The fused LM-head cross-entropy bounds its logits memory without changing a number.

The softcap and its gradient are computed in place (two fp32 (rows x vocab) buffers per chunk, not
five); the values must equal the out-of-place formula exactly, and the per-row input gradient must
not depend on the chunk size beyond fp32 rounding (each row's gradient comes from its own logits).
"""

from __future__ import annotations

import torch

from sftflow.training.loss import FusedLinearCrossEntropy


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float):
    """Autograd through materialised logits: tanh(logits / softcap) * softcap, summed cross-entropy."""
    h = hidden.detach().clone().requires_grad_(True)
    logits = torch.tanh((h @ weight.T) / softcap) * softcap
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad


def _fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, chunk: int):
    h = hidden.detach().clone().requires_grad_(True)
    loss = FusedLinearCrossEntropy.apply(h, weight, None, targets, softcap, torch.float32, chunk)
    loss.backward()
    return loss.detach(), h.grad


def test_in_place_softcap_equals_autograd_reference() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=g) * 3  # large logits: the softcap is active
    weight = torch.randn(500, 24, generator=g)
    targets = torch.randint(0, 500, (37,), generator=g)
    ref_loss, ref_grad = _reference(hidden, weight, targets, 30.0)
    loss, grad = _fused(hidden, weight, targets, 30.0, chunk=16)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_input_gradient_does_not_depend_on_the_chunk() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 16, generator=g) * 2
    weight = torch.randn(300, 16, generator=g)
    targets = torch.randint(0, 300, (50,), generator=g)
    whole_loss, whole_grad = _fused(hidden, weight, targets, 30.0, chunk=50)
    for chunk in (1, 7, 16):
        loss, grad = _fused(hidden, weight, targets, 30.0, chunk=chunk)
        # row by row (only BLAS blocking differs with the number of rows): equal to fp32 rounding
        assert torch.allclose(grad, whole_grad, rtol=1e-5, atol=1e-6), chunk
        assert torch.allclose(loss, whole_loss, rtol=1e-6, atol=0), chunk  # only the sum's order differs


def test_chunk_of_gemma_vocab_bounds_the_logits_buffer() -> None:
    from sftflow.training import loss as loss_mod

    rows = max(16, loss_mod._HEAD_CHUNK_ELEMS // 262_144)
    assert rows * 262_144 * 4 <= 128 * 2**20  # one fp32 logits buffer of Gemma's head: <= 128 MiB
