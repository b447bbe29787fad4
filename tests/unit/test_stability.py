"""Issue 24's stable recipe for the trainable token rows, on the tiny model: untrained rows start at the
mean of the trained rows, the token group's lr warms up on its own, and its gradient norm is clipped
apart from the adapter's (sftflow.training.tokens.init_untrained_rows, sftflow.training.model.make_optimizer)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sftflow.config_sections import TrainingConfig


def _cfg(**kw) -> TrainingConfig:
    base = {"batch_size": 4, "max_steps": 8, "learning_rate": 1e-3, "precision": "fp32", "checkpoint_every": None,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "warmup_ratio": 0.25, "lr_scheduler": "cosine"}
    return TrainingConfig.model_validate({**base, **kw})


def _untrained_model(n_twins: int = 40):
    """tiny-gemma whose <end_of_turn> row is one of ``n_twins`` near-identical rows (like Gemma 3 base)."""
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    w = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    common = torch.randn(w.shape[1], generator=g)
    twins = list(range(w.shape[0] - n_twins, w.shape[0])) + [eot]
    with torch.no_grad():
        for i in twins:
            w[i] = common + 1e-3 * torch.randn(w.shape[1], generator=g)
    return model, tok, eot, twins


def _rows(model) -> torch.nn.Parameter:
    from sftflow.inference.token_rows import token_rows_of

    found = next(f for f in (token_rows_of(m) for m in model.modules() if hasattr(m, "trainable_tokens_delta")) if f)
    return found[1]


def test_untrained_row_starts_at_the_mean_of_the_trained_rows(sftflow_home: Path) -> None:
    from sftflow.training.model import apply_method

    model, tok, eot, twins = _untrained_model()
    w = model.get_input_embeddings().weight.detach().clone()
    trained = torch.ones(w.shape[0], dtype=torch.bool)
    trained[twins] = False
    expected = w[trained].mean(dim=0)
    sot = tok.convert_tokens_to_ids("<start_of_turn>")  # a trained row, listed explicitly: kept as it is
    peft_model = apply_method(model, _cfg(), token_ids=[eot, sot])
    rows = _rows(peft_model)
    ids = list(next(m for m in peft_model.modules() if hasattr(m, "token_indices")).token_indices["default"])
    assert torch.allclose(rows[ids.index(eot)], expected, atol=1e-5)
    assert not torch.allclose(rows[ids.index(eot)], w[eot], atol=1e-2)  # it moved out of the cluster
    assert torch.equal(rows[ids.index(sot)], w[sot])
    # The model's output for <end_of_turn> is the new row (tied head): the forward uses it.
    x = torch.tensor([[eot]])
    emb = peft_model.get_input_embeddings()(x)[0, 0]
    scale = float(peft_model.get_input_embeddings().token_adapter.base_layer.embed_scale)
    assert torch.allclose(emb, expected * scale, atol=1e-4)


def test_init_rows_off_keeps_the_untrained_row(sftflow_home: Path) -> None:
    from sftflow.training.model import apply_method

    model, _, eot, _ = _untrained_model()
    w = model.get_input_embeddings().weight.detach().clone()
    rows = _rows(apply_method(model, _cfg(), token_ids=[eot], init_rows=False))
    assert torch.equal(rows[0], w[eot])


def _optimizer(**kw):
    from sftflow.training.model import apply_method, make_optimizer

    model, _, eot, _ = _untrained_model()
    cfg = _cfg(**kw.pop("cfg", {}))
    model = apply_method(model, cfg, token_ids=[eot])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(model, cfg, trainable=trainable, total_steps=8, device=torch.device("cpu"), **kw)
    return model, cfg, opt, sched


def test_token_rows_warm_up_on_top_of_the_schedule(sftflow_home: Path) -> None:
    from sftflow.training.model import token_rows_learning_rate

    model, cfg, opt, sched = _optimizer(token_warmup_fraction=0.5)  # 4 of 8 steps
    groups = opt.param_groups
    assert [bool(g.get("token_rows")) for g in groups] == [False, False, True]
    peak_rows, peak = token_rows_learning_rate(cfg), 1e-3
    assert math.isclose(peak_rows, 25 * peak)
    seen_rows, seen_adapter = [], []
    for _ in range(8):
        seen_adapter.append(groups[0]["lr"])
        seen_rows.append(groups[2]["lr"])
        opt.step()
        sched.step()
    # The adapter follows the plain schedule; the rows follow it times a ramp (s+1)/5 for s < 4.
    for s in range(8):
        assert math.isclose(seen_rows[s], seen_adapter[s] / peak * peak_rows * min(1.0, (s + 1) / 5), rel_tol=1e-6)
    assert seen_rows[1] < seen_adapter[1] / peak * peak_rows  # warm-up at work on a step where the schedule is not 0
    _, _, opt0, _ = _optimizer(token_warmup_fraction=0.0)
    assert math.isclose(opt0.param_groups[2]["lr"], opt0.param_groups[0]["lr"] * 25, rel_tol=1e-6)


def test_warmup_survives_a_checkpoint_round_trip(sftflow_home: Path, tmp_path: Path) -> None:
    model, cfg, opt, sched = _optimizer()
    for _ in range(3):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    _, _, opt2, sched2 = _optimizer()
    sched2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=False))
    assert [round(x, 12) for x in sched2.get_last_lr()] == [round(x, 12) for x in sched.get_last_lr()]
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert math.isclose(opt2.param_groups[2]["lr"], opt.param_groups[2]["lr"], rel_tol=1e-9)


@pytest.mark.parametrize("per_group", [True, False])
def test_token_rows_clip_on_their_own(sftflow_home: Path, per_group: bool) -> None:
    from sftflow.training.model import adapter_params

    model, cfg, opt, _ = _optimizer(per_group_clip=per_group, cfg={"max_grad_norm": 1.0})
    rows = opt.param_groups[2]["params"]
    adapter = [p for g in opt.param_groups[:2] for p in g["params"]]
    for p in adapter:
        p.grad = torch.full_like(p, 1e-4)
    for p in rows:
        p.grad = torch.full_like(p, 10.0)  # a row gradient far above max_grad_norm
    adapter_grads = [p.grad.clone() for p in adapter]
    clipped = adapter_params(opt, per_group_clip=per_group)
    torch.nn.utils.clip_grad_norm_(clipped, cfg.max_grad_norm)  # what the loop does
    opt.step()
    row_norm = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in rows])))
    if per_group:
        assert {id(p) for p in clipped} == {id(p) for p in adapter}
        assert math.isclose(row_norm, 1.0, rel_tol=1e-4)  # the rows' own clip (pre-step hook)
        assert all(torch.equal(p.grad, g) for p, g in zip(adapter, adapter_grads))  # the adapter's untouched
    else:  # one global clip: the rows' big norm shrinks the adapter's gradient too
        assert len(clipped) == len(adapter) + len(rows)
        assert all(float(p.grad.abs().max()) < 1e-5 for p in adapter)


def test_training_loop_uses_the_recipe(sftflow_home: Path) -> None:
    """The real loop trains the untrained row from the mean start (it moves; loss is finite)."""
    from sftflow.data.records import make_record, records_to_frame
    from sftflow.data.refs import ModelRef, write_parquet
    from sftflow.training.loop import train

    model, tok, eot, twins = _untrained_model()
    out = sftflow_home / "models" / "tiny-gemma-untrained"
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    base = ModelRef(path=str(out), sha256="0" * 64, kind="base", name="tiny-gemma-untrained")
    recs = [make_record([{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"The answer is {2 * i}."}], source="unit:synthetic")
            for i in range(16)]
    data = write_parquet(records_to_frame(recs), sftflow_home / "data" / "train.parquet", name="train")
    res = train(train=data, heldout=None, base=base, cfg=_cfg(max_steps=4), out_dir=sftflow_home / "train")
    hist = res.metrics_dict()
    assert hist["trainable_token_rows"] == 1.0 and math.isfinite(hist["train_loss"])
    from safetensors.torch import load_file

    merged = {}
    for f in sorted(Path(res.merged.path).glob("*.safetensors")):
        merged.update(load_file(str(f)))
    emb = next(v for k, v in merged.items() if k.endswith("embed_tokens.weight"))
    w = model.get_input_embeddings().weight.detach()
    trained = torch.ones(w.shape[0], dtype=torch.bool)
    trained[twins] = False
    # Started at the trained rows' mean, then moved a little: far closer to the mean than to the cluster.
    assert float((emb[eot] - w[trained].mean(0)).norm()) < 0.5 * float((emb[eot] - w[eot]).norm())
