"""Trainable token rows (sftflow.training.tokens + the LoRA set-up): untrained control-token rows are
detected, train under LoRA (and only they among the embedding rows), and survive merge and adapter export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sftflow.config_sections import TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import ModelRef, write_parquet


def _records(n: int) -> list[dict]:
    return [make_record([{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"The answer is {2 * i}."}], source="unit:synthetic")
            for i in range(n)]


def _cfg(**kw) -> TrainingConfig:
    base = {"batch_size": 4, "max_steps": 4, "learning_rate": 3e-3, "precision": "fp32", "checkpoint_every": None,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return TrainingConfig.model_validate({**base, **kw})


def _untrain_row(model, tid: int, n_twins: int = 40) -> None:
    """Make row ``tid`` look like Gemma base's <end_of_turn>: one of many near-identical rows."""
    w = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    common = torch.randn(w.shape[1], generator=g)
    twins = [i for i in range(w.shape[0] - n_twins, w.shape[0])] + [tid]
    with torch.no_grad():
        for i in twins:
            w[i] = common + 1e-3 * torch.randn(w.shape[1], generator=g)


@pytest.fixture()
def untrained_base(sftflow_home: Path) -> tuple[ModelRef, int]:
    """tiny-gemma saved with an untrained-looking <end_of_turn> row; returns (ref, its id)."""
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    _untrain_row(model, eot)
    out = sftflow_home / "models" / "tiny-gemma-untrained-eot"
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return ModelRef(path=str(out), sha256="0" * 64, kind="base", name="tiny-gemma-untrained-eot"), eot


@pytest.fixture()
def data(sftflow_home: Path):
    return write_parquet(records_to_frame(_records(16)), sftflow_home / "data" / "train.parquet", name="train")


def _embedding(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return next(v for k, v in tensors.items() if k.endswith("embed_tokens.weight"))


# ----------------------------------------------------------------------------- detection
def test_control_tokens_of_the_templates(sftflow_home: Path) -> None:
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.tokens import template_control_token_ids

    _, tok = load_model(build_tiny_model("tiny-gemma"))
    ids = template_control_token_ids(tok, "gemma")
    assert ids[0] == tok.convert_tokens_to_ids("<end_of_turn>")
    assert tok.convert_tokens_to_ids("<start_of_turn>") in ids and tok.eos_token_id in ids
    assert tok.bos_token_id not in ids and tok.pad_token_id not in ids
    _, tok = load_model(build_tiny_model("tiny-chatml"))
    ids = template_control_token_ids(tok, "native")
    assert {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")} <= set(ids)


def test_untrained_rows_are_detected_and_random_rows_are_not(sftflow_home: Path) -> None:
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.tokens import resolve_trainable_tokens, untrained_token_ids

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    eot, sot = tok.convert_tokens_to_ids("<end_of_turn>"), tok.convert_tokens_to_ids("<start_of_turn>")
    assert untrained_token_ids(model, range(model.get_input_embeddings().weight.shape[0])) == []
    assert resolve_trainable_tokens(model, tok, "gemma", "auto") == []
    _untrain_row(model, eot)
    assert untrained_token_ids(model, [eot, sot, 7]) == [eot]
    assert resolve_trainable_tokens(model, tok, "gemma", "auto") == [eot]
    assert resolve_trainable_tokens(model, tok, "gemma", "none") == []
    # A few look-alikes (<= max(8, 0.1% of vocab)) are not enough to call a row untrained.
    model, _ = load_model(build_tiny_model("tiny-gemma"))
    _untrain_row(model, eot, n_twins=5)
    assert untrained_token_ids(model, [eot]) == []


def test_explicit_list_and_unknown_token_error(sftflow_home: Path) -> None:
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.tokens import resolve_trainable_tokens

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert resolve_trainable_tokens(model, tok, "gemma", ["<end_of_turn>", 7, eot]) == sorted({eot, 7})
    with pytest.raises(ValueError, match=r"training\.trainable_tokens.*<no_such_token>"):
        resolve_trainable_tokens(model, tok, "gemma", ["<no_such_token>"])
    with pytest.raises(ValueError, match=r"training\.trainable_tokens.*outside"):
        resolve_trainable_tokens(model, tok, "gemma", [10**6])


# ----------------------------------------------------------------------------- training
def test_auto_trains_the_untrained_row_only_and_it_survives_merge_and_export(sftflow_home: Path, untrained_base, data) -> None:
    from sftflow.inference.models import load_model, resolve_model
    from sftflow.training.loop import train

    base, eot = untrained_base
    before = _embedding(base.path)
    out = train(train=data, heldout=None, base=base, cfg=_cfg(), out_dir=sftflow_home / "train-auto")
    assert out.metrics_dict()["trainable_token_rows"] == 1.0
    merged = _embedding(out.merged.path)
    changed = (merged - before).abs().amax(dim=1) > 0
    assert changed.nonzero().flatten().tolist() == [eot]  # the row moved, no other row did
    # The adapter export reloads with the same row (peft stores it in the adapter).
    model, _ = load_model(resolve_model(out.adapter.path))
    assert torch.allclose(model.merge_and_unload().get_input_embeddings().weight[eot], merged[eot], atol=1e-6)
    # The merged model's (tied) output row is the trained row too.
    mmodel, _ = load_model(resolve_model(out.merged.path))
    assert torch.equal(mmodel.get_output_embeddings().weight[eot], merged[eot])


def test_token_rows_receive_gradients(sftflow_home: Path, untrained_base) -> None:
    from sftflow.inference.models import load_model
    from sftflow.training.model import apply_method

    base, eot = untrained_base
    model, tok = load_model(base)
    model = apply_method(model, _cfg(), token_ids=[eot])
    rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(rows) == 1 and rows[0].shape[0] == 1 and rows[0].requires_grad
    ids = torch.tensor([[tok.bos_token_id, 10, 11, eot, 12, eot]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert rows[0].grad is not None and rows[0].grad.abs().sum() > 0


def test_none_leaves_every_embedding_row_alone(sftflow_home: Path, untrained_base, data) -> None:
    from sftflow.training.loop import train

    base, _ = untrained_base
    before = _embedding(base.path)
    out = train(train=data, heldout=None, base=base, cfg=_cfg(trainable_tokens="none"), out_dir=sftflow_home / "train-none")
    assert out.metrics_dict()["trainable_token_rows"] == 0.0
    assert torch.equal(_embedding(out.merged.path), before)


def test_bf16_cast_leaves_the_tied_head_of_a_token_wrapper_alone(sftflow_home: Path, untrained_base) -> None:
    """The LM head wrapped for token rows is still recognised (its tied embedding stays float32)."""
    from sftflow.inference.models import load_model
    from sftflow.training.model import apply_method, cast_frozen_linears, restore_weights

    base, eot = untrained_base
    model, _ = load_model(base)
    model = apply_method(model, _cfg(), token_ids=[eot])
    originals = cast_frozen_linears(model, torch.bfloat16)
    assert originals and not any("lm_head" in n for n in originals)
    assert model.get_input_embeddings().token_adapter.base_layer.weight.dtype == torch.float32
    restore_weights(model, originals)


def test_token_rows_train_at_their_own_larger_learning_rate(sftflow_home: Path, untrained_base, data) -> None:
    """An untrained row must travel far in few steps: it gets ``trainable_tokens_lr`` (default 25x)."""
    from sftflow.training.loop import train
    from sftflow.training.model import token_rows_learning_rate

    base, eot = untrained_base
    assert token_rows_learning_rate(_cfg(learning_rate=1e-4)) == pytest.approx(2.5e-3)
    assert token_rows_learning_rate(_cfg(trainable_tokens_lr=5e-2)) == 5e-2
    emb = _embedding(base.path).float()
    cluster = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(emb[eot], dim=0) > 0.99
    before = emb[~cluster].mean(0)  # where the row starts: the mean of the trained rows (init_untrained_rows)
    moved = {}
    for lr in (1e-4, 1e-2):
        out = train(train=data, heldout=None, base=base, cfg=_cfg(learning_rate=1e-4, trainable_tokens_lr=lr),
                    out_dir=sftflow_home / f"train-lr-{lr}")
        moved[lr] = float((_embedding(out.merged.path)[eot] - before).abs().max())
    # Adam moves each coordinate by about lr per step: 4 steps at 1e-2 move the row ~100x further.
    assert moved[1e-2] > 20 * moved[1e-4] > 0
