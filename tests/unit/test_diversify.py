"""Prompt-format diversification: wrappers inside the chat template, labels on the answer only."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftflow.config_sections import FormatDiversificationConfig, TrainingConfig
from sftflow.data.records import make_record, records_to_frame
from sftflow.data.refs import write_parquet
from sftflow.data.wrappers import WRAPPER_NAMES, choose_wrapper, get_wrapper, wrap_messages
from sftflow.inference.formatting import IGNORE_INDEX, encode_for_training


def _records(n: int) -> list[dict]:
    return [make_record([{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
                         {"role": "assistant", "content": f"The sum is {2 * i}."}], source="unit:q")
            for i in range(n)]


@pytest.fixture(scope="module")
def tok(tiny_models_home: Path):
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTFLOW_HOME", str(tiny_models_home))
        return load_model(build_tiny_model("tiny-gemma"))[1]


def test_wrap_messages_changes_user_turns_only() -> None:
    msgs = [{"role": "user", "content": "Name a prime {0}."}, {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "11"}]
    qa = wrap_messages(msgs, "qa")
    assert [m["content"] for m in qa] == ["Q: Name a prime {0}.\nA:", "7", "Q: Another?\nA:", "11"]
    assert msgs[0]["content"] == "Name a prime {0}."  # the input is not mutated
    sys = wrap_messages(msgs, "system_line")
    assert sys[0] == {"role": "system", "content": get_wrapper("system_line").system} and sys[1:] == msgs
    own = [{"role": "system", "content": "Be brief."}] + msgs
    assert wrap_messages(own, "system_line") == own  # the row's own system prompt wins
    assert wrap_messages(msgs, "plain") == msgs
    with pytest.raises(ValueError, match="unknown prompt wrapper 'nope'.*known: plain"):
        wrap_messages(msgs, "nope")


def test_choice_is_deterministic_and_respects_the_share() -> None:
    ids = [f"row{i}" for i in range(4000)]
    names = ["qa", "human_assistant", "alpaca"]
    first = [choose_wrapper(i, seed=3, share=0.3, names=names) for i in ids]
    assert first == [choose_wrapper(i, seed=3, share=0.3, names=names) for i in ids]
    wrapped = [w for w in first if w is not None]
    assert 0.27 < len(wrapped) / len(ids) < 0.33
    assert all(abs(wrapped.count(n) / len(wrapped) - 1 / 3) < 0.05 for n in names)
    other = [choose_wrapper(i, seed=4, share=0.3, names=names) for i in ids]
    assert other != first  # another seed, another draw
    assert all(choose_wrapper(i, seed=3, share=0.0, names=names) is None for i in ids[:50])
    assert all(choose_wrapper(i, seed=3, share=1.0, names=names) is not None for i in ids[:50])


@pytest.mark.parametrize("template", ["gemma", "chatml"])
def test_labels_stay_on_the_answer_token_by_token(tok, template: str) -> None:
    from sftflow.training.data import encode_records

    recs = _records(40)
    div = FormatDiversificationConfig(share=1.0, wrappers=[n for n in WRAPPER_NAMES if n != "plain"])
    plain = encode_records(recs, tok, template=template, max_seq_len=4096)
    wrapped = encode_records(recs, tok, template=template, max_seq_len=4096, diversify=div, seed=0)
    assert sum(wrapped.wrapped.values()) == 40 and len(wrapped.wrapped) >= 4
    for rec, (pids, plabs), (wids, wlabs) in zip(recs, plain.rows, wrapped.rows):
        name = choose_wrapper(rec["id"], seed=0, share=1.0, names=div.wrappers)
        # The wrapped row is exactly the chat-template rendering of the wrapped conversation ...
        ids, labels = encode_for_training(tok, wrap_messages(rec["messages"], name), template=template)
        assert (wids, wlabs) == (ids, labels)
        assert wids != pids
        # ... whose learned tokens are the answer (and its end marker), token for token the same as unwrapped.
        learned_w = [t for t, lab in zip(wids, wlabs) if lab != IGNORE_INDEX]
        learned_p = [t for t, lab in zip(pids, plabs) if lab != IGNORE_INDEX]
        assert learned_w == learned_p
        assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(wids, wlabs))
        n_prompt = next(k for k, lab in enumerate(wlabs) if lab != IGNORE_INDEX)
        # The whole wrapped prompt comes before the first learned token, and is masked.
        assert n_prompt == next(k for k, lab in enumerate(plabs) if lab != IGNORE_INDEX) + len(wids) - len(pids)
        assert tok.decode(learned_w).startswith(rec["messages"][1]["content"])
        text = tok.decode(wids[:n_prompt])
        assert rec["messages"][0]["content"] in text
        marker = "<start_of_turn>user" if template == "gemma" else "<|im_start|>user"
        assert marker in text  # still inside the chat template
        if name != "system_line":
            assert get_wrapper(name).wrap_text(rec["messages"][0]["content"]) in text


def test_encode_dataset_wraps_training_rows_only(tok, sftflow_home: Path) -> None:
    from sftflow.training.data import encode_dataset

    frame = records_to_frame(_records(30))
    train = write_parquet(frame, sftflow_home / "train.parquet", name="train")
    heldout = write_parquet(frame, sftflow_home / "heldout.parquet", name="heldout")
    cfg = TrainingConfig(max_seq_len=512, format_diversification={"share": 0.5})
    got_train = encode_dataset(train, tok, template="gemma", cfg=cfg, diversify=True)
    got_held = encode_dataset(heldout, tok, template="gemma", cfg=cfg)  # the default: as is
    plain = encode_dataset(train, tok, template="gemma", cfg=TrainingConfig(max_seq_len=512))
    n_wrapped = sum(got_train.wrapped.values())
    assert 5 < n_wrapped < 25 and not got_held.wrapped and got_held.rows == plain.rows
    assert sum(a != b for a, b in zip(got_train.rows, plain.rows)) == n_wrapped
    assert encode_dataset(train, tok, template="gemma", cfg=cfg, diversify=True).rows == got_train.rows  # deterministic
    forced = encode_dataset(heldout, tok, template="gemma", cfg=cfg, diversify=True)
    assert forced.rows == got_train.rows
