"""The one held-out loss: training's eval loss and evaluation's ``heldout_loss`` are the same number,
under the same truncation; and the recipe reports step metrics through its callback only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sftflow.config_sections import TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet


def _records(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        q = f"What is {i} plus {i}?" + (" Explain briefly." * (i % 5))
        a = f"The answer is {2 * i}." + " Indeed." * (i % 6)
        out.append(make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], source="unit:s"))
    return out


def _cfg(**kw) -> TrainingConfig:
    base = {"batch_size": 4, "max_steps": 4, "learning_rate": 3e-3, "precision": "fp32", "checkpoint_every": None,
            "eval_every": 4, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return TrainingConfig.model_validate({**base, **kw})


@pytest.fixture()
def data(sftflow_home: Path):
    train = write_parquet(records_to_frame(_records(16)), sftflow_home / "d" / "train.parquet", name="train")
    heldout = write_parquet(records_to_frame(_records(6, 100)), sftflow_home / "d" / "heldout.parquet", name="heldout")
    return train, heldout


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_evaluation_loss_equals_training_eval_loss(sftflow_home: Path, data, overlong: str) -> None:
    """The merged model's held-out loss, computed the way evaluation does, is training's last eval loss."""
    from sftflow.data.records import frame_to_records
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.loss import heldout_loss
    from sftflow.training.loop import train

    # Held-out rows are 50-77 tokens: at 52, four are over-long (one loses its whole answer when
    # truncated). Truncation (or dropping) must be applied identically in both places.
    cfg = _cfg(max_seq_len=52, overlong=overlong)
    seen: list[tuple[int, dict]] = []
    out = train(train=data[0], heldout=data[1], base=build_tiny_model("tiny-gemma"), cfg=cfg,
                out_dir=sftflow_home / f"t-{overlong}", on_metrics=lambda step, m: seen.append((step, m)))
    model, tok = load_model(out.model)
    convs = [r["messages"] for r in frame_to_records(data[1].read())]
    got = heldout_loss(model, tok, convs, template=out.template, max_seq_len=cfg.max_seq_len, overlong=overlong)
    assert got.loss == pytest.approx(out.metrics_dict()["eval_loss"], rel=1e-4)
    assert got.rows == {"truncate": 5, "drop": 2}[overlong] and got.tokens > 0
    # A different truncation is a different number: the limit is part of the definition.
    longer = heldout_loss(model, tok, convs, template=out.template, max_seq_len=512, overlong=overlong)
    assert longer.tokens > got.tokens and longer.loss != pytest.approx(got.loss, rel=1e-6)
    # The callback saw every step, with the eval loss at the eval step; nothing else logs.
    assert [s for s, _ in seen] == [1, 2, 3, 4]
    assert seen[-1][1]["eval_loss"] == out.metrics_dict()["eval_loss"]
    assert set(seen[0][1]) == {"loss", "lr", "grad_norm", "tokens_per_s", "pad_fraction"}


def test_heldout_loss_without_answer_tokens_is_nan(sftflow_home: Path) -> None:
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.loss import heldout_loss

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    convs = [[{"role": "user", "content": "a long question " * 20}, {"role": "assistant", "content": "yes"}]]
    got = heldout_loss(model, tok, convs, template="gemma", max_seq_len=16)
    assert math.isnan(got.loss) and got.tokens == 0 and got.rows == 0
    ok = heldout_loss(model, tok, convs, template="gemma", max_seq_len=512)
    assert ok.tokens > 0 and math.isfinite(ok.loss) and ok.perplexity == pytest.approx(math.exp(ok.loss))


def test_heldout_loss_names_a_malformed_conversation(sftflow_home: Path) -> None:
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model
    from sftflow.training.loss import heldout_loss

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    with pytest.raises(ValueError, match="row id=1"):
        heldout_loss(model, tok, [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                  [{"role": "user", "content": "only a question"}]], template="gemma", max_seq_len=64)
