"""Trainable token rows compute sparsely (sftflow.inference.token_rows.sparse_token_rows + the fused loss).

peft's trainable-tokens layer builds a merged copy of the whole (vocab x hidden) tied matrix on
every forward and gets a dense gradient for it; for Gemma's 262k x 640 matrix that cost a third of
training throughput. Here: (a) no (vocab x hidden) tensor is made in a training step and the frozen
matrix gets no gradient, (b) the rows still learn and reach the merged export (embedding and tied
head), (c) losses and updates equal peft's dense path step for step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sftflow.config_sections import TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet


def _records(n: int) -> list[dict]:
    return [make_record([{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"The answer is {2 * i}."}], source="unit:synthetic")
            for i in range(n)]


def _cfg(**kw) -> TrainingConfig:
    base = {"batch_size": 4, "max_steps": 4, "learning_rate": 3e-3, "precision": "fp32", "checkpoint_every": None,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "trainable_tokens": ["<end_of_turn>"]}
    return TrainingConfig.model_validate({**base, **kw})


class _ShapeLog(TorchDispatchMode):
    """Records the shape of every new tensor an aten op returns (forward and backward; views aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        seen = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # a view (transpose, slice) shares its input's storage: nothing new is allocated
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.shapes.append(tuple(t.shape))
        return out


def _setup(sparse: bool, *, precision: str = "fp32"):
    """tiny-gemma + LoRA + the <end_of_turn> row; the new (sparse) or the previous (peft dense) path."""
    from sftflow.inference.formatting import resolve_template
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.data import collate, encode_records
    from sftflow.training.loss import CausalLMLoss
    from sftflow.training.model import apply_method

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    torch.manual_seed(0)  # the same LoRA initialisation on both paths
    model = apply_method(model, _cfg(), token_ids=[eot])
    if not sparse:  # the previous implementation: peft's own forward, the head module unfused
        for m in model.modules():
            m.__dict__.pop("forward", None)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loss_mod = CausalLMLoss(model, compute_dtype=dtype, fused=sparse)
    template = resolve_template(tok, None)
    data = encode_records(({"messages": r["messages"]} for r in _records(8)), tok, template=template, max_seq_len=64)
    batch = collate(data.rows, list(range(8)), packed=False, pad_id=tok.pad_token_id, max_len=64)
    return model, tok, loss_mod, batch, eot


def _rows_param(model) -> torch.nn.Parameter:
    rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(rows) == 1
    return rows[0]


def _step(model, loss_mod, batch, opt, precision: str = "fp32") -> float:
    from sftflow.training.loss import autocast

    model.train()
    with autocast(torch.device("cpu"), precision):
        loss, n = loss_mod(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
    (loss / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()) / n


def _optimizer(model) -> torch.optim.Optimizer:
    rows = _rows_param(model)
    others = [p for p in model.parameters() if p.requires_grad and p is not rows]
    return torch.optim.AdamW([{"params": others}, {"params": [rows], "lr": 5e-2, "weight_decay": 0.0}], lr=3e-3)


# ----------------------------------------------------------------------------- (a) sparse
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "peft-dense"])
def test_no_dense_vocab_tensor_and_no_grad_on_the_frozen_matrix(sftflow_home: Path, sparse: bool) -> None:
    model, _, loss_mod, batch, _ = _setup(sparse)
    emb = model.get_input_embeddings().token_adapter.base_layer.weight
    full = tuple(emb.shape)
    opt = _optimizer(model)
    _step(model, loss_mod, batch, opt)  # warm-up
    log = _ShapeLog()
    with log:
        _step(model, loss_mod, batch, opt)
    made = [s for s in log.shapes if s in (full, full[::-1])]
    if sparse:
        assert not made, f"a {full} tensor was made in a training step: {made[:3]}"
        assert not emb.requires_grad and emb.grad is None
        assert model.get_output_embeddings().token_adapter.base_layer.weight is emb  # still tied
    else:  # the check sees what peft's dense path does (the regression this guards against)
        assert len(made) >= 2


# ----------------------------------------------------------------------------- (c) equal losses
@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-5), ("bf16", 2e-3)])
def test_losses_and_updates_match_the_dense_path(sftflow_home: Path, precision: str, rtol: float) -> None:
    runs = {}
    for sparse in (True, False):
        model, _, loss_mod, batch, _ = _setup(sparse, precision=precision)
        start = _rows_param(model).detach().clone()
        opt = _optimizer(model)
        losses = [_step(model, loss_mod, batch, opt, precision) for _ in range(4)]
        runs[sparse] = (losses, _rows_param(model).detach().clone(),
                        {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    (l_new, r_new, lora_new), (l_old, r_old, lora_old) = runs[True], runs[False]
    assert l_new == pytest.approx(l_old, rel=rtol)
    assert l_new[-1] < l_new[0]  # it trains
    assert float((r_old - start).abs().max()) > 0.1  # the row moved (4 Adam steps at lr 5e-2)
    if precision == "fp32":
        # The same updates to fp32 rounding. (Not compared in bf16: Adam turns bf16-sized gradient
        # differences on near-zero coordinates into lr-sized steps on either path.)
        assert torch.allclose(r_new, r_old, atol=1e-6)
        for n in lora_new:
            assert torch.allclose(lora_new[n], lora_old[n], atol=1e-6), n


def test_sparse_forward_equals_peft_forward(sftflow_home: Path) -> None:
    """The model's own forward (generation, the head check) gives peft's logits with the rows moved."""
    model, tok, _, batch, eot = _setup(True)
    with torch.no_grad():
        _rows_param(model).add_(0.5)  # rows that differ from the frozen matrix
        new = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for m in model.modules():
            m.__dict__.pop("forward", None)
        old = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (batch["input_ids"] == eot).any()
    assert torch.allclose(new, old, atol=1e-5)


# ----------------------------------------------------------------------------- (b) export
def test_rows_learn_and_reach_the_merged_embedding_and_tied_head(sftflow_home: Path) -> None:
    from safetensors.torch import load_file

    from sftflow.inference.models import load_model, resolve_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.loop import train

    base = build_tiny_model("tiny-gemma")
    bmodel, tok = load_model(base)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    before = bmodel.get_input_embeddings().weight.detach().clone()
    data = write_parquet(records_to_frame(_records(16)), sftflow_home / "data" / "train.parquet", name="train")
    out = train(train=data, heldout=None, base=base, cfg=_cfg(trainable_tokens_lr=1e-2), out_dir=sftflow_home / "t")
    assert out.metrics_dict()["trainable_token_rows"] == 1.0
    assert out.history()[-1]["loss"] < out.history()[0]["loss"]
    saved = {}
    for f in Path(out.merged.path).glob("*.safetensors"):
        saved.update(load_file(str(f)))
    emb = next(v for k, v in saved.items() if k.endswith("embed_tokens.weight"))
    changed = ((emb - before).abs().amax(dim=1) > 0).nonzero().flatten().tolist()
    assert changed == [eot]  # the row moved, no other row did
    merged, _ = load_model(resolve_model(out.merged.path))
    head = merged.get_output_embeddings().weight
    assert torch.equal(head[eot], emb[eot]) and not torch.equal(head[eot], before[eot])
    # The adapter export carries the same row; loaded unmerged, it computes sparsely with the same logits.
    amodel, _ = load_model(resolve_model(out.adapter.path))
    ids = torch.tensor([[tok.bos_token_id, 10, 11, eot, 12, eot]])
    assert "forward" in vars(amodel.get_input_embeddings().token_adapter)
    with torch.no_grad():
        sparse = amodel(input_ids=ids).logits
        for m in amodel.modules():
            m.__dict__.pop("forward", None)
        assert torch.allclose(sparse, amodel(input_ids=ids).logits, atol=1e-5)
    assert torch.allclose(amodel.merge_and_unload().get_input_embeddings().weight[eot], emb[eot], atol=1e-6)
