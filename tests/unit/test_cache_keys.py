"""Content-addressed cache keys (sftflow.ops.cachekeys): data bytes, model folders, code closure, libraries.

Real files throughout; the last test runs a real Prefect flow (ephemeral server, SQLite under a
tmp $SFTFLOW_HOME) in a subprocess to check that the policy decides what Prefect serves from cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from sftflow.ops import cachekeys as ck
from sftflow.config_sections import (AugmentationConfig, CorpusConfig, DedupConfig, EvaluationConfig, ExtraEvalSet,
                                     SourceConfig)
from sftflow.data.refs import DatasetRef, ModelRef, sha256_file, write_parquet

REPO = Path(__file__).resolve().parents[2]


def _ref(tmp_path: Path, rows: list[str], name: str = "d.parquet") -> DatasetRef:
    return write_parquet(pd.DataFrame({"text": rows}), tmp_path / name, name="data")


def _key(inputs: dict, module: str = "tasks.dedup") -> str:
    return ck.stage_key(inputs, module=module)


def test_nothing_changed_same_key(tmp_path: Path) -> None:
    ref = _ref(tmp_path, ["a", "b"])
    src = tmp_path / "src.jsonl"
    src.write_text('{"instruction": "q", "output": "a"}\n')
    inputs = {"datasets": [ref], "cfg": DedupConfig(), "sources": [SourceConfig(name="s", path=str(src))],
              "stage": "dedup", "ctx": object()}
    assert _key(inputs) == _key(dict(inputs))
    # ctx (run ids) is never part of the key; any other argument is
    assert _key({**inputs, "ctx": "another run"}) == _key(inputs)
    assert _key({**inputs, "stage": "dedup_augmented"}) != _key(inputs)


def test_dataset_edited_in_place_changes_key(tmp_path: Path) -> None:
    ref = _ref(tmp_path, ["a", "b"])
    before = _key({"dataset": ref})
    # Same path, same recorded sha256 in the ref: only the bytes on disk differ.
    pd.DataFrame({"text": ["a", "c"]}).to_parquet(ref.path, index=False)
    assert _key({"dataset": ref}) != before
    comps = ck.stage_key_components({"dataset": ref}, module="tasks.dedup")
    assert comps["inputs"]["dataset"]["DatasetRef"]["content"] == sha256_file(ref.path)


def test_missing_dataset_changes_key_and_does_not_raise(tmp_path: Path) -> None:
    ref = _ref(tmp_path, ["a"])
    before = _key({"dataset": ref})
    os.remove(ref.path)
    after = _key({"dataset": ref})
    assert after != before
    assert ck.stage_key_components({"dataset": ref}, module="tasks.dedup")["inputs"]["dataset"]["DatasetRef"][
        "content"] == "missing"


def test_source_file_edited_in_place_same_size_changes_key(tmp_path: Path) -> None:
    src = tmp_path / "src.jsonl"
    src.write_text('{"instruction": "q", "output": "a"}\n')
    cfg = [SourceConfig(name="s", path=str(src))]
    before = _key({"sources": cfg}, module="tasks.ingest")
    st = src.stat()
    src.write_text('{"instruction": "q", "output": "b"}\n')  # same size, likely the same mtime tick
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the mtime put back
    assert _key({"sources": cfg}, module="tasks.ingest") != before


def test_glob_and_directory_sources_cover_every_file(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.jsonl").write_text("1\n")
    glob_cfg = [SourceConfig(name="s", path=str(d / "*.jsonl"))]
    k1 = _key({"sources": glob_cfg})
    (d / "b.jsonl").write_text("2\n")  # a new shard matching the glob
    k2 = _key({"sources": glob_cfg})
    assert k2 != k1
    files = ck.stage_key_components({"sources": glob_cfg}, module="tasks.ingest")["inputs"]["sources"][0]["files"]
    assert files == {str(d / "a.jsonl"): sha256_file(d / "a.jsonl"), str(d / "b.jsonl"): sha256_file(d / "b.jsonl")}
    # a folder (datasets.save_to_disk layout) counts with every file below it
    saved = tmp_path / "saved"
    (saved / "train").mkdir(parents=True)
    (saved / "dataset_dict.json").write_text("{}")
    (saved / "train" / "data.arrow").write_bytes(b"x" * 10)
    dir_cfg = [SourceConfig(name="s", path=str(saved))]
    k3 = _key({"sources": dir_cfg})
    (saved / "train" / "data.arrow").write_bytes(b"y" * 10)
    assert _key({"sources": dir_cfg}) != k3
    # a glob matching nothing is a key too (and differs from one that matches)
    empty = [SourceConfig(name="s", path=str(tmp_path / "none" / "*.jsonl"))]
    assert ck.stage_key_components({"sources": empty}, module="tasks.ingest")["inputs"]["sources"][0]["files"] == {
        str(tmp_path / "none" / "*.jsonl"): "missing"}


def test_corpus_and_extra_eval_sets_and_model_paths_in_configs(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.json"
    corpus.write_text('[{"text": "one"}]')
    aug = AugmentationConfig(enabled=True, corpus=CorpusConfig(path=str(corpus)))
    k1 = _key({"cfg": aug}, module="tasks.backtranslate")
    corpus.write_text('[{"text": "two"}]')
    assert _key({"cfg": aug}, module="tasks.backtranslate") != k1

    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"instruction": "q", "output": "a"}\n')
    judge = tmp_path / "judge-model"
    judge.mkdir()
    (judge / "config.json").write_text("{}")
    ev = EvaluationConfig(extra_sets=[ExtraEvalSet(name="x", path=str(extra))], judge=True, judge_model=str(judge))
    k2 = _key({"cfg": ev}, module="tasks.evaluate")
    extra.write_text('{"instruction": "q", "output": "b"}\n')
    k3 = _key({"cfg": ev}, module="tasks.evaluate")
    (judge / "config.json").write_text('{"a": 1}')  # a local judge model folder named by a string
    k4 = _key({"cfg": ev}, module="tasks.evaluate")
    assert len({k2, k3, k4}) == 3


def test_model_folder_contents_and_large_file_memo(tmp_path: Path) -> None:
    import sftflow.digests as digests

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    big = base / "model.safetensors"
    big.write_bytes(b"\0" * (digests.MEMO_MIN_BYTES + 1))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"w1")
    ref = ModelRef(path=str(adapter), sha256="recorded", kind="adapter", base=str(base),
                   meta=(("template", "gemma"), ("mlflow_run_id", "r1")))
    k1 = _key({"model": ref}, module="tasks.evaluate")
    n_memo = len(digests._memo)
    assert n_memo >= 1  # the big file was memoized on its stat signature
    assert _key({"model": ref}, module="tasks.evaluate") == k1 and len(digests._memo) == n_memo
    # run identifiers in meta are not part of the key; what describes the model is
    assert _key({"model": ModelRef(**{**ref.__dict__, "meta": (("template", "gemma"), ("mlflow_run_id", "r2"))})},
                module="tasks.evaluate") == k1
    assert _key({"model": ModelRef(**{**ref.__dict__, "meta": (("template", "chatml"),)})},
                module="tasks.evaluate") != k1
    # the adapter's bytes, and its base model's bytes, are both covered
    (adapter / "adapter_model.safetensors").write_bytes(b"w2")
    k2 = _key({"model": ref}, module="tasks.evaluate")
    with open(big, "r+b") as f:  # rewrite the big base weights in place (new mtime/ctime)
        f.write(b"\1")
    k3 = _key({"model": ref}, module="tasks.evaluate")
    assert len({k1, k2, k3}) == 3
    comps = ck.stage_key_components({"model": ref}, module="tasks.evaluate")["inputs"]["model"]["ModelRef"]
    assert comps["base_content"] == "dir:" + ck.dir_digest(base)


def test_library_versions_are_part_of_the_key() -> None:
    import importlib.metadata
    import platform

    libs = ck.library_versions()
    assert libs["torch"] == importlib.metadata.version("torch") and libs["python"] == platform.python_version()
    for dist in ("transformers", "peft", "pandas", "pyarrow", "numpy", "great_expectations", "python"):
        assert libs[dist] and libs[dist] != "absent", dist
    comps = ck.stage_key_components({}, module="tasks.ingest")
    assert comps["libraries"] == libs
    bumped = json.loads(json.dumps(comps))
    bumped["libraries"]["transformers"] = "0.0.1"
    assert ck.key_of(bumped) != ck.key_of(comps)


def test_unhashable_argument_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot describe"):
        ck.stage_key({"x": object()}, module="tasks.ingest")


@pytest.fixture()
def project_copy(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    for pkg in ck.PROJECT_PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_code_closure_is_per_stage(project_copy: Path) -> None:
    root = project_copy
    dedup = set(ck.code_closure("tasks.dedup", root=root))
    ingest = set(ck.code_closure("tasks.ingest", root=root))
    assert root / "sftflow" / "data" / "minhash.py" in dedup and root / "sftflow" / "data" / "minhash.py" not in ingest
    assert root / "tasks" / "__init__.py" in ingest and root / "sftflow" / "__init__.py" in ingest

    d0, i0 = ck.code_digest("tasks.dedup", root=root), ck.code_digest("tasks.ingest", root=root)
    assert ck.code_digest("tasks.dedup", root=root) == d0  # nothing changed
    # a helper only dedup imports: dedup's code key changes, ingest's does not
    with open(root / "sftflow" / "data" / "minhash.py", "a") as f:
        f.write("\n# edited\n")
    d1, i1 = ck.code_digest("tasks.dedup", root=root), ck.code_digest("tasks.ingest", root=root)
    assert d1["digest"] != d0["digest"] and i1["digest"] == i0["digest"]
    # a helper both import (sftflow/data/refs.py): both change
    with open(root / "sftflow" / "data" / "refs.py", "a") as f:
        f.write("\n# edited\n")
    assert ck.code_digest("tasks.dedup", root=root)["digest"] != d1["digest"]
    assert ck.code_digest("tasks.ingest", root=root)["digest"] != i1["digest"]


def test_code_closure_follows_lazy_and_relative_imports(project_copy: Path) -> None:
    root = project_copy
    (root / "sftflow" / "lazyhelper.py").write_text("X = 1\n")
    (root / "sftflow" / "relhelper.py").write_text("Y = 1\n")
    (root / "sftflow" / "relmod.py").write_text("from .relhelper import Y\n")
    with open(root / "tasks" / "ingest.py", "a") as f:
        f.write("\n\ndef _late():\n    from sftflow.lazyhelper import X\n    from sftflow import relmod\n    return X\n")
    files = {p.relative_to(root).as_posix() for p in ck.code_closure("tasks.ingest", root=root)}
    assert {"sftflow/lazyhelper.py", "sftflow/relmod.py", "sftflow/relhelper.py"} <= files
    before = ck.code_digest("tasks.ingest", root=root)["digest"]
    (root / "sftflow" / "relhelper.py").write_text("Y = 2\n")
    assert ck.code_digest("tasks.ingest", root=root)["digest"] != before


def test_stage_components_of_a_task_function_use_its_module() -> None:
    from tasks.dedup import dedup_task

    comps = ck.stage_key_components({"cfg": DedupConfig()}, fn=dedup_task.fn)
    assert "tasks/dedup.py" in comps["code"]["files"] and "sftflow/data/minhash.py" in comps["code"]["files"]
    assert comps["code"] == ck.code_digest("tasks.dedup")


def test_orchestration_policy_is_the_content_policy() -> None:
    from sftflow.ops.orchestration import stage_cache_policy

    pol = stage_cache_policy()
    from prefect.cache_policies import CachePolicy

    assert isinstance(pol, ck.StageCachePolicy) and isinstance(pol, CachePolicy) and pol.exclude == ["ctx"]
    assert (pol - "stage").exclude == ["ctx", "stage"]
    import pickle

    assert pickle.loads(pickle.dumps(pol)) == pol  # by reference: sftflow.ops.cachekeys.StageCachePolicy


def test_importing_cachekeys_does_not_import_prefect() -> None:
    # Prefect freezes its settings at import; configure_environment must be able to run first.
    code = "import sys, sftflow.ops.cachekeys, sftflow.ops.orchestration; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_refresh_cache_requested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_TASKS_REFRESH_CACHE", "true")
    assert ck.refresh_cache_requested()
    monkeypatch.delenv("PREFECT_TASKS_REFRESH_CACHE")
    assert not ck.refresh_cache_requested()


_FLOW_SCRIPT = '''
import json, os, sys
from pathlib import Path

from sftflow.ops.orchestration import configure_environment

configure_environment()
from prefect import flow, task

from sftflow.ops.cachekeys import current_stage_key
from sftflow.ops.orchestration import stage_cache_policy
from sftflow.data.refs import DatasetRef

LOG = Path(sys.argv[1])


@task(cache_policy=stage_cache_policy(), persist_result=True)
def count_rows(dataset: DatasetRef, *, ctx: str) -> int:
    key = current_stage_key()
    with open(LOG, "a") as f:
        f.write(json.dumps({"ctx": ctx, "key": key[0] if key else None}) + "\\n")
    return len(Path(dataset.path).read_bytes())


@flow(persist_result=True)
def f(dataset: DatasetRef, ctx: str) -> int:
    return count_rows(dataset, ctx=ctx)


ref = DatasetRef(**json.loads(sys.argv[2]))
print(json.dumps({"result": f(ref, sys.argv[3])}))
'''


def test_prefect_serves_cache_only_for_unchanged_bytes(tmp_path: Path) -> None:
    """A real Prefect flow (ephemeral API + SQLite under tmp): cached when unchanged, rerun on an
    in-place edit, a missing file or PREFECT_TASKS_REFRESH_CACHE."""
    script = tmp_path / "flow_script.py"
    script.write_text(textwrap.dedent(_FLOW_SCRIPT))
    data = tmp_path / "data.bin"
    data.write_bytes(b"abc")
    ref = json.dumps({"path": str(data), "sha256": sha256_file(data), "num_rows": 3, "name": "d"})
    log = tmp_path / "executions.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"SFTFLOW_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "PREFECT_LOGGING_LEVEL": "WARNING"})
    # One process runs the flow several times (one ephemeral server start): pass steps via a driver.
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f'''
        import os, runpy, sys
        from pathlib import Path
        data = Path({str(data)!r})
        steps = [("r1", None), ("r2", None), ("r3", b"abcd"), ("r4", "refresh"), ("r5", "rm")]
        for ctx, action in steps:
            if isinstance(action, bytes):
                data.write_bytes(action)
            elif action == "refresh":
                os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
                from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings
                with temporary_settings(updates={{PREFECT_TASKS_REFRESH_CACHE: True}}):
                    sys.argv = ["x", {str(log)!r}, {ref!r}, ctx]
                    runpy.run_path({str(script)!r}, run_name="flow_script")
                os.environ.pop("PREFECT_TASKS_REFRESH_CACHE")
                continue
            elif action == "rm":
                data.unlink()
                data.write_bytes(b"abcd")  # same bytes as r3 again: cached
            sys.argv = ["x", {str(log)!r}, {ref!r}, ctx]
            runpy.run_path({str(script)!r}, run_name="flow_script")
    '''))
    proc = subprocess.run([sys.executable, str(driver)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    executed = [r["ctx"] for r in runs]
    # r2: unchanged -> cached; r3: edited in place -> runs; r4: refresh -> runs; r5: re-created
    # with the same bytes as r3 -> cached (content, not path or inode, is the key).
    assert executed == ["r1", "r3", "r4"], executed
    assert all(r["key"] for r in runs)
    assert runs[0]["key"] != runs[1]["key"] and runs[1]["key"] == runs[2]["key"]


# ----------------------------------------------------------------------------- the training work folder
def _chat_rows(n: int, offset: int = 0) -> pd.DataFrame:
    from sftflow.data.records import make_record, records_to_frame

    return records_to_frame([make_record([{"role": "user", "content": f"What is {i} plus {i}?"},
                                          {"role": "assistant", "content": f"The answer is {2 * i}."}],
                                         source="unit:synthetic") for i in range(offset, offset + n)])


def test_train_work_dir_keyed_by_content_and_no_cache_retrains(sftflow_home: Path, stage_ctx,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The `_train/<key>` folder: reused for identical content+code, never under --no-cache, and a
    new folder when the training file changes in place; the run and the version carry the digests."""
    import mlflow

    from sftflow.config_sections import TrainingConfig
    from sftflow.inference.tiny import build_tiny_model
    from tasks.train import OUTPUT_FILE, train_task

    monkeypatch.delenv("PREFECT_TASKS_REFRESH_CACHE", raising=False)
    train = write_parquet(_chat_rows(12), sftflow_home / "data" / "train.parquet", name="train")
    heldout = write_parquet(_chat_rows(4, 100), sftflow_home / "data" / "heldout.parquet", name="heldout")
    base = build_tiny_model("tiny-gemma")
    cfg = TrainingConfig.model_validate({"batch_size": 4, "max_steps": 3, "learning_rate": 3e-3, "precision": "fp32",
                                         "checkpoint_every": None, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    client = mlflow.MlflowClient()
    work_txt = Path(stage_ctx.run_dir) / "train" / "work_dir.txt"

    def run() -> tuple[object, dict, Path]:
        res = train_task.fn(train, heldout, base, cfg, ctx=stage_ctx, register_as="sftflow-ck")
        return res, client.get_run(res.run_id).data.tags, Path(work_txt.read_text().strip())

    r1, t1, w1 = run()
    assert t1["sftflow.train.reused_output"] == "false" and (w1 / OUTPUT_FILE).exists()
    assert t1["sftflow.train.sha256"] == sha256_file(train.path)
    assert t1["sftflow.heldout.sha256"] == sha256_file(heldout.path)
    assert t1["sftflow.base.sha256"] == ck.dir_digest(base.path)
    assert w1.name == t1["sftflow.train_key"][:16]
    mv = client.get_model_version("sftflow-ck", r1.registered_version)
    for k in ("sftflow.train.sha256", "sftflow.heldout.sha256", "sftflow.base.sha256", "sftflow.train_key",
              "sftflow.code_digest"):
        assert mv.tags[k] == t1[k], k
    assert mv.tags["sftflow.model.sha256"] == r1.model.sha256
    assert t1["sftflow.code_digest"] == ck.code_digest(Path(sys.modules["tasks.train"].__file__))["digest"]

    r2, t2, w2 = run()  # same content and code: the finished output is reused
    assert w2 == w1 and t2["sftflow.train.reused_output"] == "true"
    assert client.get_metric_history(r2.run_id, "loss") == []

    monkeypatch.setenv("PREFECT_TASKS_REFRESH_CACHE", "true")  # what `sftflow run --no-cache` sets
    r3, t3, w3 = run()
    assert w3 == w1 and t3["sftflow.train.reused_output"] == "false"
    assert [m.step for m in client.get_metric_history(r3.run_id, "loss")] == [1, 2, 3]
    monkeypatch.delenv("PREFECT_TASKS_REFRESH_CACHE")

    # Rewrite the training file in place (same path): a new key, a new folder, new digests.
    train2 = write_parquet(_chat_rows(8), train.path, name="train")
    assert train2.path == train.path
    r4 = train_task.fn(train2, heldout, base, cfg, ctx=stage_ctx, register_as="sftflow-ck")
    t4 = client.get_run(r4.run_id).data.tags
    w4 = Path(work_txt.read_text().strip())
    assert w4 != w1 and t4["sftflow.train.reused_output"] == "false"
    assert t4["sftflow.train.sha256"] == sha256_file(train.path) != t1["sftflow.train.sha256"]
    assert client.get_model_version("sftflow-ck", r4.registered_version).tags["sftflow.train.sha256"] == \
        t4["sftflow.train.sha256"]
