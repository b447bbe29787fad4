"""Rejection sampling's prompt pool: where prompts come from and which are not to be sampled.

The pool is the train split's prompts (``prompts: train``: each record's turns before its last
assistant turn, system tag included) or a prompt file (``.jsonl``/``.json`` rows with
``prompt``/``instruction``/``question`` and an optional ``answer``, or ``.txt``, one prompt a line),
shuffled with ``seed`` and capped at ``max_prompts``. Screening marks a prompt that repeats an
earlier pool prompt (``duplicate_prompt``) or duplicates a held-out prompt
(``duplicate_of_heldout``: ``sftflow.data.neardup.find_cross_duplicates``, the leak rule dedup and
split use): training on it would leak the evaluation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sftflow.config_sections import DedupConfig, RejectionSamplingConfig
from sftflow.data.neardup import find_cross_duplicates, strongest_matches
from sftflow.data.records import frame_to_records, make_record, normalize_text, prompt_text
from sftflow.data.refs import DatasetRef
from sftflow.rejection.selection import DUP_HELDOUT, DUP_PROMPT

_PROMPT_KEYS = ("prompt", "instruction", "question", "input_text")


@dataclass(frozen=True)
class PoolPrompt:
    """One prompt of the pool.

    Attributes:
        prompt_id: the source record's id (train) or a stable hash of the prompt (file).
        messages: the turns before the answer (system/user/...; never ending with an assistant turn), as
            ``(role, content)`` pairs, or ``(role, content, tool_calls JSON)`` for an assistant turn that
            calls tools (a tool conversation's prompt keeps its calls, or it cannot be rendered).
        answer: the reference final answer of a verifiable task ('' when none).
        source: the source name (train rows keep theirs; file rows get the file's stem).
        category: the category ('' when none).
        tools: JSON tool schemas ('' when none).
    """

    prompt_id: str
    messages: tuple[tuple[str, ...], ...]
    answer: str = ""
    source: str = ""
    category: str = ""
    tools: str = ""

    def turns(self) -> list[dict[str, str]]:
        """``messages`` as role/content dicts (with ``tool_calls`` where a turn has them)."""
        return [{"role": m[0], "content": m[1], **({"tool_calls": m[2]} if len(m) > 2 and m[2] else {})}
                for m in self.messages]

    @property
    def text(self) -> str:
        """The user turns joined (the key of the duplicate checks)."""
        return prompt_text(self.turns())


def prompt_turns(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The turns before the last assistant turn (all turns when there is none), tool calls kept."""
    msgs = []
    for m in messages:
        turn = {"role": str(m["role"]), "content": str(m["content"])}
        calls = m.get("tool_calls")
        if isinstance(calls, str) and calls.strip():
            turn["tool_calls"] = calls
        msgs.append(turn)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    return msgs if last is None else msgs[:last]


def pool_from_records(records: Sequence[dict[str, Any]]) -> list[PoolPrompt]:
    """One pool prompt per canonical record: its turns before the last assistant turn, tool calls kept."""
    out = []
    for r in records:
        turns = prompt_turns(r["messages"])
        out.append(PoolPrompt(prompt_id=str(r["id"]),
                              messages=tuple((m["role"], m["content"], *([m["tool_calls"]] if "tool_calls" in m else []))
                                             for m in turns),
                              answer=str(r.get("answer") or ""), source=str(r.get("source") or ""),
                              category=str(r.get("category") or ""), tools=str(r.get("tools") or "")))
    return out


def read_prompt_file(path: str | Path) -> list[PoolPrompt]:
    """Prompts of an unlabeled prompt file.

    ``.txt``: one prompt a line (blank lines skipped). ``.jsonl``: one JSON object a line;
    ``.json``: a list of objects. An object gives its prompt in ``prompt``, ``instruction``,
    ``question`` or ``input_text`` (an ``input`` field is appended as context) and may carry a
    reference ``answer``.

    Raises:
        ValueError: naming the file and line/row, for malformed JSON or a row without a prompt.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"rejection_sampling.prompts: file not found: {p}")
    source = p.stem
    rows: list[tuple[int, Any]] = []
    if p.suffix == ".txt":
        rows = [(i, {"prompt": line.strip()}) for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                if line.strip()]
    elif p.suffix == ".jsonl":
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {i}: not valid JSON ({e.msg})") from None
    elif p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of objects, got {type(data).__name__}")
        rows = list(enumerate(data, 1))
    else:
        raise ValueError(f"{p}: unsupported prompt file type {p.suffix!r} (expected .jsonl, .json or .txt)")
    out = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{p}: row {i}: expected an object with one of {list(_PROMPT_KEYS)}, "
                             f"got {type(row).__name__}")
        text = next((str(row[k]) for k in _PROMPT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        if text is None:
            raise ValueError(f"{p}: row {i}: no prompt (expected a non-empty string in one of {list(_PROMPT_KEYS)})")
        if isinstance(row.get("input"), str) and row["input"].strip():
            text = f"{text.strip()}\n\n{row['input'].strip()}"
        answer = row.get("answer", "")
        turns = [{"role": "user", "content": text.strip()}]
        rec = make_record(turns, source=source, answer=str(answer) if answer is not None else "")
        out.append(PoolPrompt(prompt_id=rec["id"], messages=(("user", text.strip()),), answer=rec["answer"],
                              source=source, category=str(row.get("category") or "")))
    return out


def load_pool(cfg: RejectionSamplingConfig, *, train: DatasetRef) -> list[PoolPrompt]:
    """The prompt pool per ``cfg.prompts``, shuffled with ``cfg.seed`` and capped at ``cfg.max_prompts``."""
    if cfg.prompts == "train":
        pool = pool_from_records(frame_to_records(train.read()))
    else:
        pool = read_prompt_file(cfg.prompts)
    random.Random(cfg.seed).shuffle(pool)
    return pool[: cfg.max_prompts] if cfg.max_prompts else pool


def screen_prompts(pool: Sequence[PoolPrompt], *, heldout: DatasetRef | None,
                   dedup: DedupConfig | None = None) -> dict[int, tuple[str, str]]:
    """Prompts not to sample, by pool position: ``(reason, detail)``.

    A prompt whose normalised text repeats an earlier pool prompt is a ``duplicate_prompt``; one
    that duplicates a held-out prompt (exactly or nearly, under the pipeline's ``dedup`` rule on
    the prompt key, as dedup's held-out pass) is a ``duplicate_of_heldout``.
    """
    out: dict[int, tuple[str, str]] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(pool):
        key = normalize_text(item.text + "\x00" + "\x00".join(f"{r}:{c}" for r, c, *_ in item.messages if r == "system"))
        if key in first:
            out[i] = (DUP_PROMPT, f"same prompt as pool row {first[key]}")
        else:
            first[key] = i
    if heldout is not None and heldout.num_rows:
        ref = heldout.read()
        pairs = strongest_matches(find_cross_duplicates([p.text for p in pool], ref, cfg=dedup or DedupConfig(),
                                                        key="prompt"))
        ids = ref["id"].tolist() if "id" in ref.columns else []
        for q, pair in pairs.items():
            if q not in out:
                what = "exact" if pair.exact else f"jaccard {pair.similarity:.2f}"
                match = ids[pair.match] if pair.match < len(ids) else pair.match
                out[q] = (DUP_HELDOUT, f"{what} duplicate of held-out row {match}")
    return out
