"""Per-row held-out losses compute the head in chunks of positions (bounded logits memory), with
the same numbers as one pass over a whole row."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_row_losses_are_the_same_in_chunks(sftflow_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sftflow.training.loss as loss
    from sftflow.inference.formatting import stop_token_ids
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model

    model, tok = load_model(build_tiny_model("tiny-gemma"))
    convs = [[{"role": "user", "content": f"Count to {i}."},
              {"role": "assistant", "content": " ".join(str(k) for k in range(3 * i + 20))}] for i in range(4)]
    stops = stop_token_ids(tok, "gemma")
    whole = loss.row_losses(model, tok, convs, template="gemma", max_seq_len=512, stop_ids=stops)
    monkeypatch.setattr(loss, "_HEAD_CHUNK_ELEMS", 1)  # 16 positions per chunk (the floor)
    chunked = loss.row_losses(model, tok, convs, template="gemma", max_seq_len=512, stop_ids=stops)
    assert all(r.tokens > 16 for r in whole)  # every row spans several chunks
    for a, b in zip(whole, chunked):
        assert b.tokens == a.tokens and b.answer_tokens == a.answer_tokens
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
        assert b.answer_loss == pytest.approx(a.answer_loss, rel=1e-6)
        assert b.end_logprob == pytest.approx(a.end_logprob, rel=1e-6, abs=1e-6)
