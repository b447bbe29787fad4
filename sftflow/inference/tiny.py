"""Tiny random models for tests: ``tiny-gemma`` and ``tiny-chatml``.

``build_tiny_model`` builds a randomly initialised, seeded, few-hundred-KB causal LM with a real
byte-level BPE tokenizer trained on a built-in corpus, in about a second, into
``$SFTFLOW_HOME/models/<name>/`` (written atomically by ``sftflow.inference.model_store``). Same
code + same library versions give byte-identical files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sftflow import layout
from sftflow.data.refs import ModelRef
from sftflow.inference.model_store import (
    RECIPE_VERSION,
    ModelError,
    ModelNotFoundError,
    add_end_of_turn_eos,
    build_atomically,
    complete_ref,
)

TINY_MODELS = ("tiny-gemma", "tiny-chatml")
_TINY_SEED = 1234
_TINY_VOCAB = 1024

# SmolLM2-135M-Instruct's own chat template (copied from its GGUF), so code that formats for
# tiny-chatml meets the same default system prompt the real model adds.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Built-in training text for the tiny tokenizers: instruction-style English, chat markers,
# numbers and code, so common words and formatting get merges (real text, deterministic).
_TINY_CORPUS = """\
Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction: Give three tips for staying healthy.
### Response: 1. Eat a balanced and nutritious diet. 2. Engage in regular physical activity. 3. Get enough sleep.
### Human: What is the capital of France? ### Assistant: The capital of France is Paris.
### Human: Who wrote Hamlet? ### Assistant: Hamlet was written by William Shakespeare around 1600.
user: Summarize the following paragraph in one sentence.
assistant: The paragraph explains how plants use sunlight, water and carbon dioxide to make sugar.
Photosynthesis is the process by which green plants and some other organisms use sunlight to
synthesize foods from carbon dioxide and water. It generally involves the green pigment chlorophyll
and generates oxygen as a byproduct. The history of the city begins in the third century, when a
small settlement was founded on the river. Today it is known for its museums, its university and
its music. The population was 2,145,906 at the 2020 census, making it the largest city in the state.
Please rate the answer on a scale from 1 to 5, where 1 is poor and 5 is excellent. Score: 4
Score: 1 Score: 2 Score: 3 Score: 4 Score: 5. The answer is 42. 3 + 4 = 7, 10 - 6 = 4, 12 / 3 = 4.
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May.
Natalia sold 48+24 = 72 clips altogether in April and May. #### 72
def add(a, b):
    return a + b
for i in range(10):
    print(i)
Write a short poem about the sea. The sea is wide, the sea is deep, it sings the sailors all to sleep.
Explain why the sky is blue. Sunlight is scattered by the molecules in the air, and blue light is
scattered more than red light because it has a shorter wavelength. This is called Rayleigh scattering.
Translate the sentence into French: I like apples. J'aime les pommes.
Classify the sentiment of this review: The movie was wonderful and the actors were great. Positive.
List the planets of the solar system: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune.
What are the benefits of exercise? Regular exercise improves heart health, strengthens muscles,
helps control weight, reduces stress and improves sleep and mood.
Generate a list of five creative names for a coffee shop. 1. Bean There 2. The Daily Grind
3. Brew Haven 4. Steam and Leaf 5. Cup of Joy
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
"""

_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(name: str, *, force: bool = False) -> ModelRef:
    """Build (once) a tiny, seeded, randomly initialised causal LM with a real tokenizer.

    ``tiny-gemma``: Gemma3ForCausalLM (hidden 64, 2 layers, 2 heads) and a byte-level BPE
    tokenizer with ``<bos> <eos> <pad> <start_of_turn> <end_of_turn>`` as single tokens, a BOS
    added on encode and NO chat template (like Gemma 3 base). ``tiny-chatml``: LlamaForCausalLM of
    the same size with ``<|im_start|>``/``<|im_end|>`` and a ChatML ``chat_template`` (like
    SmolLM2-Instruct). In both, the digits ``"1"``..``"5"`` are single tokens.

    Same code + same library versions give byte-identical files (fixed seed, fixed corpus).
    The result is cached in ``models_dir()/<name>/``; a second call returns at once.

    Args:
        name: ``tiny-gemma`` or ``tiny-chatml``.
        force: rebuild even when a complete directory exists.

    Returns:
        The ``ModelRef`` (kind ``base``).
    """
    if name not in TINY_MODELS:
        raise ModelNotFoundError(f"unknown tiny model {name!r}; tiny models: {list(TINY_MODELS)}")
    out = layout.models_dir() / name
    expect = {"recipe": RECIPE_VERSION}
    if not force:
        ref = complete_ref(out, name=name, expect=expect)
        if ref is not None:
            return ref
    return build_atomically(
        out, name=name, build=lambda tmp: _build_tiny(name, tmp), keep_if=None if force else expect
    )


def _train_tiny_tokenizer(specials: list[str]) -> Any:
    """Byte-level BPE trained on ``_TINY_CORPUS``; digits are always split into single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Split digits first (as Gemma does) so "1".."5" never merge into bigger number tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    return tok


def _build_tiny(name: str, tmp: Path) -> dict[str, Any]:
    """Write the tiny model ``name`` into ``tmp``; return manifest facts."""
    import torch
    from tokenizers import processors
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    if name == "tiny-gemma":
        raw = _train_tiny_tokenizer(_GEMMA_SPECIALS)
        bos_id = raw.token_to_id("<bos>")
        # Gemma prepends <bos> to every encoded text.
        raw.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        )
    else:
        raw = _train_tiny_tokenizer(_CHATML_SPECIALS)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
        tokenizer.chat_template = CHATML_TEMPLATE
    for digit in "12345":
        ids = tokenizer.encode(digit, add_special_tokens=False)
        if len(ids) != 1:  # a broken tokenizer would silently break the rubric scorer
            raise ModelError(f"{name}: digit {digit!r} encodes to {ids}, expected one token")

    torch.manual_seed(_TINY_SEED)
    config = _tiny_config(name, tokenizer)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    add_end_of_turn_eos(model, tokenizer)  # same stop ids as the converted Gemma
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    return {
        "source": {"kind": "tiny", "seed": _TINY_SEED, "corpus_sha256": hashlib.sha256(_TINY_CORPUS.encode()).hexdigest()},
        "architecture": type(model).__name__,
        "num_params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "recipe": RECIPE_VERSION,
    }


def _tiny_config(name: str, tokenizer: Any) -> Any:
    """The transformers config of a tiny model (hidden 64, 2 layers, 2 heads, 1 KV head)."""
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if name == "tiny-gemma":
        return Gemma3TextConfig(
            **common,
            eos_token_id=tokenizer.eos_token_id,
            query_pre_attn_scalar=32,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"],
            architectures=["Gemma3ForCausalLM"],
        )
    return LlamaConfig(**common, eos_token_id=tokenizer.eos_token_id, architectures=["LlamaForCausalLM"])
