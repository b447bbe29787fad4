"""What an evaluation evaluates: the held-out rows, the extra sets, each conversation's prompt and
reference, and ``eval_key``, the digest of everything that makes two evaluations comparable.

Extra sets are read by ingestion's converters (``sftflow.data.formats.load_records``), so every
format and role alias ingest accepts works here, multi-turn conversations included.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sftflow.config_sections import EvaluationConfig, ExtraEvalSet
from sftflow.data.records import frame_to_records
from sftflow.data.refs import DatasetRef, ModelRef, sha256_file, sha256_json
from sftflow.errors import DataError
from sftflow.inference.judges import scorer_digest


def split_prompt_reference(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Prompt = every turn before the last assistant turn; reference = that assistant turn.

    A reference that calls tools is its text plus its calls (``tool_format.assistant_text``).

    Raises:
        ValueError: the conversation has no assistant turn, or no user turn before it.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise ValueError("no assistant turn to use as the reference")
    prompt = list(messages[:last])
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError("no user turn before the last assistant turn")
    from sftflow.inference.tool_format import assistant_text

    return prompt, assistant_text(messages[last])


def load_eval_set(spec: ExtraEvalSet, *, max_rows: int | None = None) -> list[dict[str, Any]]:
    """Load an extra held-out set as ``[{id, messages}]`` (the first ``max_rows`` usable rows).

    Rows are read and converted by ingestion's converters (``sftflow.data.formats.load_records``:
    every format and role alias ingest knows, every turn kept), so an extra set means what the same
    file would mean as training data. Rows that cannot be used are skipped and counted, never
    silently: more than half of the file unusable is an error naming the file and the first rows.

    Raises:
        DataError: the file is missing or unusable (``IngestError``), or most of its rows are.
    """
    from sftflow.data.formats import load_records
    from sftflow.data.records import record_id

    where = f"evaluation.extra_sets[{spec.name}]"
    got = load_records(spec.path, format=spec.format, where=where)
    if not got.records or len(got.rejected) > len(got.records):
        shown = "; ".join(f"row {r.row}: {r.reason}" for r in got.rejected[:3])
        raise DataError(f"{where}: {len(got.rejected)} of {got.read} rows in {got.path} are unusable: {shown}")
    limit = spec.max_rows or max_rows
    # Every converted conversation ends with an assistant turn after a user turn (formats checks
    # it), so each one splits into a prompt and a reference.
    records = got.records[:limit] if limit else got.records
    return [{"id": record_id(r.messages, tools=r.tools), "messages": r.messages, "source": spec.name,
             "category": r.category, "answer": r.answer, "tools": r.tools} for r in records]


def _text(value: Any) -> str:
    """A metadata cell as text: "" for a missing value (None, NaN: older frames lack the column)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def heldout_rows(heldout: DatasetRef, *, max_rows: int | None = None) -> list[dict[str, Any]]:
    """The held-out split as ``[{id, messages, source, category, answer, tools}]`` (the first ``max_rows``).

    Raises:
        ValueError: a row without a prompt and reference (naming the file and the row id).
    """
    df = heldout.read()
    rows = []
    for rec in frame_to_records(df):
        try:
            split_prompt_reference(rec["messages"])
        except ValueError as e:
            raise ValueError(f"held-out dataset {heldout.path} row id={rec['id']}: {e}") from None
        rows.append({"id": rec["id"], "messages": rec["messages"], "source": _text(rec.get("source")),
                     "category": _text(rec.get("category")), "answer": _text(rec.get("answer")),
                     "tools": _text(rec.get("tools"))})
        if max_rows and len(rows) >= max_rows:
            break
    return rows


def eval_key(*, heldout: DatasetRef, cfg: EvaluationConfig, template: str | None, max_seq_len: int,
             judge: ModelRef | None = None) -> str:
    """Digest of what makes two evaluations comparable (data + generation settings + formatting + judge).

    With ``evaluation.judge`` the judge's content digest (``judges.scorer_digest(judge)``) is part
    of it: two evaluations scored by different judges never share a key.
    """
    extra = []
    for s in cfg.extra_sets:
        p = Path(s.path)
        extra.append([s.name, s.format, s.max_rows, sha256_file(p) if p.is_file() else s.path])
    key: dict[str, Any] = {}
    if cfg.format_robustness.wrappers:  # only when on, so that keys of earlier evaluations stay valid
        key["format_robustness"] = [cfg.format_robustness.wrappers, cfg.format_robustness.max_examples]
    if cfg.judge:  # likewise: keys of evaluations without a judge stay what they were
        key["judge_sha256"] = scorer_digest(judge)
    return sha256_json(
        {
            **key,
            "heldout": heldout.sha256,
            "extra": extra,
            "max_examples": cfg.max_examples,
            "max_new_tokens": cfg.max_new_tokens,
            "auto": [cfg.auto_quantile, cfg.auto_max_new_tokens] if cfg.max_new_tokens == "auto" else None,
            "do_sample": cfg.do_sample,
            "temperature": cfg.temperature if cfg.do_sample else None,
            "top_p": cfg.top_p if cfg.do_sample else None,
            "seed": cfg.seed,
            "judge": cfg.judge_model if cfg.judge else None,
            "template": template,
            "max_seq_len": max_seq_len,
            "dtype": cfg.dtype,
        }
    )


def common_system_tag(rows: list[dict[str, Any]]) -> str | None:
    """The system-turn tag every row's prompt starts with (``sftflow.data.tags.tag_records``), else None.

    A tagged row's first turn is the system turn ``<tag>`` or ``<tag>\\n\\n<its own system prompt>``;
    the tag is the shortest such first turn when every row's system turn is it or starts with it.
    Caveat: a set whose rows all share one genuine system prompt (and no tag) reads as tagged.
    """
    firsts = [r["messages"][0]["content"] if r.get("messages") and r["messages"][0]["role"] == "system" else None
              for r in rows]
    if not firsts or any(not f for f in firsts):
        return None
    tag = min(firsts, key=len)
    return tag if all(f == tag or f.startswith(tag + "\n\n") for f in firsts) else None


def without_tag(messages: list[dict[str, str]], tag: str | None) -> list[dict[str, str]]:
    """``messages`` as a user of the served model sends them: the tag (and its system turn, when it
    is all of it) removed; a row's own system prompt after the tag stays."""
    if not tag or not messages or messages[0]["role"] != "system":
        return list(messages)
    content = messages[0]["content"]
    if content == tag:
        return list(messages[1:])
    if content.startswith(tag + "\n\n"):
        return [{**messages[0], "content": content[len(tag) + 2:]}, *messages[1:]]
    return list(messages)
