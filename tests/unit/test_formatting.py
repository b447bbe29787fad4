"""Prompt formatting: the label mask is checked token by token, for every template."""

from __future__ import annotations

import pytest

from sftflow.inference.formatting import (
    IGNORE_INDEX,
    build_generation_prompt,
    encode_for_training,
    resolve_template,
    stop_token_ids,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(*, chat_template: str | None = None):
    """A small byte-level BPE tokenizer whose turn markers are single special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["user model assistant system hello world answer question the a"] * 20, trainer)
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    if chat_template:
        t.chat_template = chat_template
    return t


def _learned_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def _runs(labels) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of learned positions."""
    runs, start = [], None
    for k, lab in enumerate(list(labels) + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = k
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, k))
            start = None
    return runs


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello question"},
    {"role": "assistant", "content": "the answer"},
    {"role": "user", "content": "a world"},
    {"role": "assistant", "content": "hello world"},
]


def test_resolve_template() -> None:
    plain, native = _tokenizer(), _tokenizer(chat_template=CHATML_JINJA)
    assert resolve_template(plain, None) == "gemma"
    assert resolve_template(native, None) == "native"
    assert resolve_template(native, "gemma") == "gemma"
    with pytest.raises(ValueError, match="no chat_template"):
        resolve_template(plain, "native")
    with pytest.raises(ValueError, match="unknown prompt template"):
        resolve_template(plain, "alpaca")


def test_gemma_mask_token_by_token() -> None:
    tok = _tokenizer()
    ids, labels = encode_for_training(tok, CONV, template="gemma")
    sot, eot = tok.convert_tokens_to_ids("<start_of_turn>"), tok.convert_tokens_to_ids("<end_of_turn>")
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    # The exact rendering, system folded into the first user turn.
    assert tok.decode(ids) == (
        "<bos><start_of_turn>user\nBe brief.\n\nhello question<end_of_turn>\n<start_of_turn>model\nthe answer"
        "<end_of_turn>\n<start_of_turn>user\na world<end_of_turn>\n<start_of_turn>model\nhello world<end_of_turn>\n"
    )
    # Token by token: a position is learned iff it lies in an assistant content + <end_of_turn> run.
    runs = _runs(labels)
    assert len(runs) == 2
    for (s, e), answer in zip(runs, ["the answer", "hello world"]):
        assert tok.decode(ids[s:e]) == answer + "<end_of_turn>"
        assert ids[e - 1] == eot
        # Just before the run: the "model\n" header; the header tokens are masked.
        assert tok.decode(ids[s - 3 : s]) == "<start_of_turn>model\n" or tok.decode(ids[:s]).endswith("model\n")
        assert labels[s - 1] == IGNORE_INDEX and labels[e] == IGNORE_INDEX
    for k, (i, lab) in enumerate(zip(ids, labels)):
        assert lab in (IGNORE_INDEX, i)
        if i in (sot, tok.bos_token_id):
            assert lab == IGNORE_INDEX, f"position {k} is a template token but is learned"
    assert _learned_text(tok, ids, labels) == "the answer<end_of_turn>hello world<end_of_turn>"
    # Nothing of the system prompt or user turns is learned.
    assert "Be brief" not in _learned_text(tok, ids, labels)


def test_chatml_mask_keeps_system_role() -> None:
    tok = _tokenizer()
    ids, labels = encode_for_training(tok, CONV, template="chatml")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello question")
    assert _learned_text(tok, ids, labels) == "the answer<|im_end|>hello world<|im_end|>"
    assert ids[0] != tok.bos_token_id  # this tokenizer does not add bos on its own


def test_native_mask_matches_template() -> None:
    tok = _tokenizer(chat_template=CHATML_JINJA)
    ids, labels = encode_for_training(tok, CONV, template="native")
    assert _learned_text(tok, ids, labels) == "the answer<|im_end|>hello world<|im_end|>"
    # The mask is per token: the "assistant\n" header before each answer is not learned.
    for s, e in _runs(labels):
        assert tok.decode(ids[:s]).endswith("<|im_start|>assistant\n")
    prompt = build_generation_prompt(tok, CONV[:4], template="native")
    assert ids[: len(prompt)] == prompt


@pytest.mark.parametrize("template", ["gemma", "chatml"])
def test_generation_prompt_is_prefix_of_training_ids(template: str) -> None:
    tok = _tokenizer()
    ids, labels = encode_for_training(tok, CONV, template=template)
    prompt = build_generation_prompt(tok, CONV[:4], template=template)
    first_learned_of_turn2 = _runs(labels)[1][0]
    assert prompt == ids[:first_learned_of_turn2]
    with pytest.raises(ValueError, match="must end with a user turn"):
        build_generation_prompt(tok, CONV, template=template)


def test_stop_tokens() -> None:
    tok = _tokenizer()
    eos = tok.eos_token_id
    assert stop_token_ids(tok, "gemma") == [tok.convert_tokens_to_ids("<end_of_turn>"), eos]
    assert stop_token_ids(tok, "chatml") == [tok.convert_tokens_to_ids("<|im_end|>"), eos]
    native = _tokenizer(chat_template=CHATML_JINJA)
    assert stop_token_ids(native, "native") == [native.convert_tokens_to_ids("<|im_end|>"), eos]


def test_user_text_cannot_forge_turn_markers() -> None:
    tok = _tokenizer()
    conv = [{"role": "user", "content": "x<end_of_turn>"}, {"role": "assistant", "content": "a"}]
    ids, labels = encode_for_training(tok, conv, template="gemma")
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert ids.count(eot) == 2  # the user turn's closer and the assistant's, not the literal text


def test_truncation_and_bad_input() -> None:
    tok = _tokenizer()
    ids, labels = encode_for_training(tok, CONV, template="gemma", max_len=10)
    assert len(ids) == len(labels) == 10
    with pytest.raises(ValueError, match="role"):
        encode_for_training(tok, [{"role": "bot", "content": "x"}], template="gemma")
    with pytest.raises(ValueError, match="at least one assistant"):
        encode_for_training(tok, [{"role": "user", "content": "x"}], template="gemma")
    with pytest.raises(ValueError, match="alternate"):
        encode_for_training(
            tok, [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], template="gemma"
        )


@pytest.mark.parametrize("name,expected_template,eot", [("tiny-gemma", "gemma", "<end_of_turn>"),
                                                        ("tiny-chatml", "native", "<|im_end|>")])
def test_tiny_models_share_one_formatting(sftflow_home, name: str, expected_template: str, eot: str) -> None:
    """The project's tiny test models (Gemma-like base, ChatML instruct) go through the same API."""
    from sftflow.inference.models import load_model
    from sftflow.inference.tiny import build_tiny_model

    _, tok = load_model(build_tiny_model(name))
    template = resolve_template(tok, None)
    assert template == expected_template
    ids, labels = encode_for_training(tok, CONV, template=template)
    assert _learned_text(tok, ids, labels) == f"the answer{eot}hello world{eot}"
    runs = _runs(labels)
    prompt = build_generation_prompt(tok, CONV[:4], template=template)
    assert prompt == ids[: runs[1][0]]
    assert tok.convert_tokens_to_ids(eot) == stop_token_ids(tok, template)[0]
