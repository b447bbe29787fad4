"""Trainable token rows computed sparsely: peft's trainable-tokens layers without the dense (vocab x hidden) copy.

Training (``sftflow.training.model``, ``sftflow.training.loss``) and loading an adapter unmerged for
inference (``sftflow.inference.models``) both install this forward, so it lives in the inference layer.
Which rows train is decided in ``sftflow.training.tokens``.
"""

from __future__ import annotations

from typing import Any

import torch

# peft's TrainableTokensLayer computes its forward from ``weight.index_copy(rows)``: a fresh copy of
# the whole (vocab x hidden) matrix on every call, whose backward is a dense (vocab x hidden)
# gradient, and the tied LM head then also pays a full weight-gradient matmul (as large as the
# head's forward). For Gemma's 262k x 640 matrix that cost a third of training throughput for one
# trained row. The forward below computes the same numbers from the frozen matrix plus the few
# rows, so only the (rows x hidden) parameter ever gets a gradient.


def token_rows_of(layer: Any) -> tuple[list[int], torch.nn.Parameter] | None:
    """``(token ids, their rows)`` of a peft trainable-tokens layer or wrapper that is active, else None.

    None when the module is not such a layer, its rows are merged or disabled, or more than one
    adapter is active (peft's own forward handles those cases).
    """
    layer = getattr(layer, "token_adapter", layer)
    deltas = getattr(layer, "trainable_tokens_delta", None)
    if deltas is None or not hasattr(layer, "token_indices"):
        return None
    names = [n for n in layer.active_adapters if n in deltas]
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False) or len(names) != 1:
        return None
    return list(layer.token_indices[names[0]]), deltas[names[0]]


def _sparse_token_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's TrainableTokensLayer forward without materialising the merged matrix (same numbers)."""
    found = token_rows_of(self)
    base = self.base_layer
    if found is None or not isinstance(base, (torch.nn.Embedding, torch.nn.Linear)):
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    ids, rows = found
    idx = torch.as_tensor(ids, dtype=torch.long, device=rows.device)
    out = base(x, *args, **kwargs)  # the frozen rows (a scaled embedding applies its own scale)
    if isinstance(base, torch.nn.Embedding):
        match = x.unsqueeze(-1) == idx  # (..., k): which positions hold a trainable token
        vals = rows.to(base.weight.dtype)[match.to(torch.int8).argmax(-1)]
        scale = self._get_embed_scale()
        if scale is not None:
            vals = vals * scale.to(vals.dtype)
        return torch.where(match.any(-1, keepdim=True), vals.to(out.dtype), out)
    cols = torch.nn.functional.linear(x, rows.to(base.weight.dtype),
                                      None if base.bias is None else base.bias[idx])
    return out.index_copy(-1, idx, cols.to(out.dtype))  # the trained rows' logits replace the frozen ones


def sparse_token_rows(model: Any) -> int:
    """Make every peft trainable-tokens layer of ``model`` compute sparsely (see above).

    The layers keep their parameters, state dict, merge and save behaviour; only their forward
    changes (an instance attribute, so nothing else using peft is affected). Outputs equal peft's
    own forward (``tests/unit/test_token_rows_sparse.py``), and no (vocab x hidden) tensor is made.

    Returns:
        How many layers were switched (0 when the model trains no token rows).
    """
    import types

    n = 0
    for mod in model.modules():
        if hasattr(mod, "trainable_tokens_delta") and hasattr(mod, "base_layer") and hasattr(mod, "token_indices"):
            mod.forward = types.MethodType(_sparse_token_forward, mod)
            n += 1
    return n
