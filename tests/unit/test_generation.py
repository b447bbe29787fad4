"""Batched generation and the logit-based rubric scorer, on tiny random models and a stub model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
from sftflow.inference.generation import Generated, _length_sorted_batches, generate_batch
from sftflow.inference.rubric import (
    DEFAULT_RUBRIC,
    _score_with_shared_prefix,
    rubric_prompt_ids,
    score_pairs,
    score_token_ids,
    unparseable_share,
)
from sftflow.inference.models import load_model
from sftflow.inference.tiny import build_tiny_model

QUESTIONS = [
    "What is the capital of France?",
    "hi",
    "Write a short poem about the sea, the sky and the river, in the style of a sailor.",
    "Explain why the sky is blue.",
    "List the planets.",
]


@pytest.fixture(scope="module", params=["tiny-gemma", "tiny-chatml"])
def tiny(request, tiny_models_home):
    """(model, tokenizer, template) of a tiny random model, built once per module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SFTFLOW_HOME", str(tiny_models_home))
    try:
        model, tok = load_model(build_tiny_model(request.param))
    finally:
        mp.undo()
    return model, tok, resolve_template(tok, None)


def _prompts(tok, template, questions=QUESTIONS):
    return [build_generation_prompt(tok, [{"role": "user", "content": q}], template=template) for q in questions]


def test_batched_greedy_equals_one_at_a_time_and_keeps_order(tiny):
    model, tok, template = tiny
    prompts = _prompts(tok, template)
    assert len({len(p) for p in prompts}) > 1, "prompts must differ in length so left padding happens"
    stops = stop_token_ids(tok, template)
    single = [generate_batch(model, tok, [p], max_new_tokens=10, batch_size=1, stop_ids=stops, seed=0)[0]
              for p in prompts]
    batched = generate_batch(model, tok, prompts, max_new_tokens=10, batch_size=2, stop_ids=stops, seed=0)
    assert batched == single
    # Input order is preserved whatever the length sorting did.
    rev = generate_batch(model, tok, prompts[::-1], max_new_tokens=10, batch_size=3, stop_ids=stops, seed=0)
    assert rev == single[::-1]
    assert all(isinstance(g, Generated) and g.num_tokens <= 10 for g in batched)


def test_stop_token_ends_generation_and_sets_finished(tiny):
    model, tok, template = tiny
    prompt = _prompts(tok, template)[0]
    # The raw greedy continuation without stop tokens (none of these ids are generated as stops).
    ids = torch.tensor([prompt])
    raw = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert len(raw) == 8
    stop = raw[3]
    first = raw.index(stop)
    out = generate_batch(model, tok, [prompt], max_new_tokens=8, batch_size=1, stop_ids=[stop], seed=0)[0]
    assert out.finished is True
    assert out.num_tokens == first
    assert out.text == tok.decode(raw[:first], skip_special_tokens=True)
    # A stop id that never comes: runs to the bound and says so.
    unused = next(t for t in range(len(tok)) if t not in raw)
    out = generate_batch(model, tok, [prompt], max_new_tokens=8, batch_size=1, stop_ids=[unused], seed=0)[0]
    assert out.finished is False and out.num_tokens == 8


def test_sampling_is_seeded(tiny):
    model, tok, template = tiny
    prompts = _prompts(tok, template)
    stops = stop_token_ids(tok, template)
    kw = dict(max_new_tokens=12, temperature=0.7, top_p=0.9, batch_size=2, stop_ids=stops)
    a = generate_batch(model, tok, prompts, seed=1, **kw)
    b = generate_batch(model, tok, prompts, seed=1, **kw)
    c = generate_batch(model, tok, prompts, seed=2, **kw)
    greedy = generate_batch(model, tok, prompts, max_new_tokens=12, batch_size=2, stop_ids=stops, seed=1)
    assert a == b
    assert a != c and a != greedy


def test_bad_inputs_are_refused(tiny):
    model, tok, template = tiny
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(model, tok, [[1, 2], []], max_new_tokens=4, batch_size=2, stop_ids=[], seed=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch(model, tok, [[1, 2]], max_new_tokens=0, batch_size=2, stop_ids=[], seed=0)
    assert generate_batch(model, tok, [], max_new_tokens=4, batch_size=2, stop_ids=[], seed=0) == []
    with pytest.raises(ValueError, match="placeholders"):
        score_pairs(model, tok, [("q", "a")], template=template, batch_size=1, rubric="no placeholders")


def test_length_sorted_batches_cover_every_index_once():
    batches = _length_sorted_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_score_tokens_decode_to_score_digits(tiny):
    _, tok, _ = tiny
    prefix, digits = score_token_ids(tok)
    for label, d in zip("12345", digits):
        assert tok.decode(prefix + [d]).replace(" ", "") == f"Score:{label}"


def test_rubric_prompt_ends_with_score_prefix(tiny):
    _, tok, template = tiny
    prefix, _ = score_token_ids(tok)
    ids = rubric_prompt_ids(tok, "What is 2+2?", "4", template=template)
    assert ids[-len(prefix):] == prefix
    opener = build_generation_prompt(
        tok, [{"role": "user", "content": DEFAULT_RUBRIC.format(instruction="What is 2+2?", response="4")}],
        template=template)
    assert ids == opener + prefix


class StubLM(torch.nn.Module):
    """A 'model' whose next-token logits at the last position are set per prompt.

    ``table`` maps a prompt's real length (unique per test pair) to the five logits of the rating
    tokens; every other vocabulary entry gets ``other``.
    """

    def __init__(self, vocab: int, digit_ids: list[int], table: dict[int, list[float]], other: float = -1e4):
        super().__init__()
        self.vocab, self.digit_ids, self.table, self.other = vocab, digit_ids, table, other
        self.calls: list[tuple[int, ...]] = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        self.calls.append(tuple(input_ids.shape))
        bsz, seqlen = input_ids.shape
        logits = torch.full((bsz, seqlen, self.vocab), self.other)
        lengths = attention_mask.sum(-1).tolist()
        for i, n in enumerate(lengths):
            # Left padding: the last column is always the last real token.
            assert attention_mask[i, -1] == 1
            logits[i, -1, self.digit_ids] = torch.tensor(self.table[int(n)])
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:, :]
        return SimpleNamespace(logits=logits)


def test_score_extraction_from_controlled_logits(tiny):
    _, tok, template = tiny
    _, digit_ids = score_token_ids(tok)
    pairs = [("q", "a"), ("a longer question here", "a longer answer, with more words in it"), ("mid q", "mid answer")]
    lengths = [len(rubric_prompt_ids(tok, q, a, template=template)) for q, a in pairs]
    assert len(set(lengths)) == 3
    logit_rows = [[0.0, 0.0, 0.0, 0.0, 10.0], [math.log(4), math.log(3), math.log(2), math.log(1), -1e9],
                  [1.0, 1.0, 1.0, 1.0, 1.0]]
    stub = StubLM(len(tok), digit_ids, dict(zip(lengths, logit_rows)))
    scores = score_pairs(stub, tok, pairs, template=template, batch_size=2)
    # One forward pass per batch: 3 pairs at batch size 2 -> 2 calls, nothing generated.
    assert len(stub.calls) == 2
    # Pair 0: almost all mass on "5".
    assert scores[0].argmax == 5 and scores[0].expected == pytest.approx(5.0, abs=1e-3)
    # Pair 1: probabilities 0.4/0.3/0.2/0.1/0 -> expected 2.0, argmax 1.
    assert scores[1].probs == pytest.approx((0.4, 0.3, 0.2, 0.1, 0.0), abs=1e-6)
    assert scores[1].expected == pytest.approx(2.0, abs=1e-5) and scores[1].argmax == 1
    # Pair 2: uniform -> expected 3.
    assert scores[2].expected == pytest.approx(3.0, abs=1e-6)
    for s in scores:
        assert sum(s.probs) == pytest.approx(1.0, abs=1e-6) and 0.99 < s.mass <= 1.0 + 1e-6


def test_score_renormalises_over_rating_tokens(tiny):
    _, tok, template = tiny
    _, digit_ids = score_token_ids(tok)
    n = len(rubric_prompt_ids(tok, "q", "a", template=template))
    # Every other token is as likely as a rating token: the raw mass on ratings is tiny, the
    # renormalised distribution still sums to 1 and is read correctly.
    stub = StubLM(len(tok), digit_ids, {n: [0.0, 0.0, math.log(3), 0.0, 0.0]}, other=0.0)
    [s] = score_pairs(stub, tok, [("q", "a")], template=template, batch_size=4)
    assert s.probs == pytest.approx((1 / 7, 1 / 7, 3 / 7, 1 / 7, 1 / 7), abs=1e-6)
    assert s.argmax == 3 and s.expected == pytest.approx(3.0, abs=1e-6)
    assert s.mass == pytest.approx(7 / (len(tok) - 5 + 7), rel=1e-4)


def test_unparseable_share_counts_ratings_the_model_did_not_expect(tiny):
    _, tok, template = tiny
    _, digit_ids = score_token_ids(tok)
    pairs = [("q", "a"), ("a longer question here", "a longer answer, with more words in it"), ("mid q", "mid answer")]
    lengths = [len(rubric_prompt_ids(tok, q, a, template=template)) for q, a in pairs]
    rest = len(tok) - 5  # every other token has logit 0 (weight 1 each)

    def digit_logit(mass: float) -> float:  # equal logits on the five ratings giving this raw mass
        return math.log(mass * rest / (5 * (1 - mass)))

    # Pair 0: the ratings hold nearly all the mass; pair 1: a rating is as likely as any token
    # (what a model that never learnt the rubric does); pair 2: just under the floor.
    table = {lengths[0]: [20.0] * 5, lengths[1]: [0.0] * 5, lengths[2]: [digit_logit(0.45)] * 5}
    scores = score_pairs(StubLM(len(tok), digit_ids, table, other=0.0), tok, pairs, template=template, batch_size=3)
    masses = [s.mass for s in scores]
    assert masses[0] > 0.99 and masses[1] < 0.01 and masses[2] == pytest.approx(0.45, rel=1e-3)
    assert unparseable_share(masses) == pytest.approx(2 / 3)
    assert unparseable_share(masses, floor=0.4) == pytest.approx(1 / 3)
    assert unparseable_share(masses[:1]) == 0.0 and unparseable_share([]) == 0.0
    assert unparseable_share([math.nan, 1.0]) == 0.5  # no rating read counts as unparseable
    with pytest.raises(ValueError, match="floor"):
        unparseable_share(masses, floor=1.5)


def test_score_pairs_batched_equals_single_on_the_tiny_model(tiny):
    """Padding and batching change no rubric probability (the tiny random model; the real 270M one: test_models)."""
    model, tok, template = tiny
    pairs = [("What is the capital of France?", "Paris."), ("hi", "Hello! How can I help you today?"),
             ("Explain why the sky is blue.", "Rayleigh scattering.")]
    batched = score_pairs(model, tok, pairs, template=template, batch_size=3)
    single = [score_pairs(model, tok, [p], template=template, batch_size=1)[0] for p in pairs]
    for b, s in zip(batched, single):
        assert b.probs == pytest.approx(s.probs, abs=1e-4)
        assert 1.0 <= b.expected <= 5.0 and b.argmax in (1, 2, 3, 4, 5)


def test_shared_prefix_scoring_equals_full_prompts(tiny):
    model, tok, template = tiny
    pairs = [("What is the capital of France?", "Paris is the capital and largest city of France."),
             ("hi", "Hello!"), ("Explain why the sky is blue.", "Sunlight is scattered by the air; " * 6),
             ("List the planets.", "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune.")]
    # The shared-prefix path really runs (tiny-gemma: its 930-token prompts exceed the 128-token
    # sliding window, so the windowed cache layers are exercised too).
    rows = [rubric_prompt_ids(tok, q, a, template=template) for q, a in pairs]
    assert _score_with_shared_prefix(model, tok, rows, score_token_ids(tok)[1], batch_size=3) is not None
    shared = score_pairs(model, tok, pairs, template=template, batch_size=3, share_prefix=True)
    full = score_pairs(model, tok, pairs, template=template, batch_size=3, share_prefix=False)
    for a, b in zip(shared, full):
        assert a.probs == pytest.approx(b.probs, abs=1e-4)
        assert a.mass == pytest.approx(b.mass, rel=1e-3)
