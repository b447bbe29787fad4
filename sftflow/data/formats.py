"""Source formats: every converter from an instruction-data format to canonical messages, in one place.

Used by ingestion (``tasks/ingest.py``) and by evaluation's extra held-out sets, so a row means the
same conversation wherever it is read. One entry point, ``load_records(path, format=...)``, reads a
file (``sftflow.data.readers``), detects or applies its format, converts every row and checks that
the conversation is trainable; bad rows come back with a reason, never raise.

Formats (``format``; ``auto`` detects per file by a majority vote of the first 50 rows):

=================  ==========================================================================
alpaca             ``{instruction, input?, output, system?}`` (also AlpacaEval ``{instruction, output}``)
dolly              ``{instruction, context?, response, category?}``
human_assistant    ``{text: "### Human: … ### Assistant: …"}`` (several turns allowed)
messages           ``{messages|conversations: [{role|from, content|value}], tools?}``; content may be a
                   string or a list of parts ``[{type: text|reasoning|tool_call, value|text}]``
                   (ShareGPT / LLaMA-Factory; a ``tool_call`` part, JSON ``{name, arguments}``,
                   becomes the turn's canonical ``tool_calls``); a turn may carry ``loss_weight``
                   (0 or 1; see below); roles: user/assistant/system and the aliases in ``ROLE_ALIASES``
                   (human, gpt, ...). Alias: ``sharegpt``. Tool calling, both layouts:
                   ShareGPT (LLaMA-Factory) ``function_call`` turns (value: JSON ``{name, arguments}``
                   or a list of them) and ``observation`` turns, plus ``tools`` (a JSON string or
                   list of ``{name, description, parameters}``); OpenAI ``messages`` whose assistant
                   turns carry ``tool_calls: [{type: function, function: {name, arguments}}]``,
                   ``role: tool`` results, plus ``tools: [{type: function, function: {...}}]``.
self_instruct      ``{instruction, instances: [{input, output}]}`` → one record per instance
gsm8k              ``{question, answer: "<worked solution>\n#### <final>"}`` (the original GSM8K
                   jsonl) or the Alpaca-shaped copy ``{instruction, input, output}`` (no ``####``:
                   the final answer is the last number). The response is the worked reasoning
                   (calculator annotations ``<<48/2=24>>`` removed) ending ``#### <final>``; the
                   final answer goes to the record's ``answer``. ``auto`` detects only the
                   ``{question, answer}`` shape (an Alpaca-shaped file needs ``format: gsm8k``).
=================  ==========================================================================

Options (per source, ``SourceConfig``), applied by every converter:

* ``reasoning: keep|drop`` (default keep): a ``{type: reasoning}`` content part (or a turn's
  ``reasoning_content``) of an assistant turn is kept as chain-of-thought,
  ``<think>\n{reasoning}\n</think>\n\n{answer}``, or dropped. A turn that only calls tools
  keeps its reasoning as its content (``<think>…</think>``), its calls in ``tool_calls``.
* per-turn ``loss_weight`` (LLaMA-Factory v1): 0 on an assistant turn keeps it as context only
  (the canonical turn carries ``loss_weight: 0.0`` and training gives it no loss); 1 is the
  default. A weight other than 0/1, 1 on a non-assistant turn, or 0 on every assistant turn
  rejects the row with the turn named.
* a table (CSV, Parquet, saved dataset) cell holding a missing-value marker (``NaN``, ``nan``,
  ``NULL``, ``None``, ``N/A``... ``NULL_MARKERS``) in a text column rejects the row.
* ``preference: chosen``: a preference (DPO) row ``{…, chosen, rejected}`` (Alpaca or ShareGPT
  shape) trains on ``chosen``; without it such rows are rejected with a reason saying so.
  A KTO row (``label: true|false``) is kept when its label is true and rejected when false.

Keys a row carries that its format does not read are counted per key (``LoadedRecords.unknown_keys``;
turn-level keys as ``turn.<key>``), so ingestion reports what it ignored.

Example::

    got = load_records("data/eval/set.jsonl", format="auto")
    conversations = [r.messages for r in got.records]  # got.rejected: (row, reason, raw)
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sftflow.data.readers import IngestError, RawRow, read_file, type_name
from sftflow.data.answers import extract_final_answer
from sftflow.data.records import has_lone_surrogate, is_blank

FORMATS: tuple[str, ...] = ("alpaca", "dolly", "human_assistant", "messages", "self_instruct", "gsm8k")
# Other spellings of a format (evaluation's config accepts ``alpaca_eval``: AlpacaEval rows are alpaca rows;
# ``sharegpt``: ShareGPT/LLaMA-Factory conversations, tool calls included, are messages rows).
FORMAT_ALIASES: dict[str, str] = {"alpaca_eval": "alpaca", "sharegpt": "messages"}
ROLE_ALIASES: dict[str, str] = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant",
    "system": "system",
}
# Turns that hold a tool's result (ShareGPT ``observation``, OpenAI ``tool``, legacy ``function``).
TOOL_RESULT_ROLES: frozenset[str] = frozenset({"observation", "tool", "function", "ipython"})
# ShareGPT turns that hold the assistant's tool call(s) as JSON.
TOOL_CALL_ROLES: frozenset[str] = frozenset({"function_call", "tool_call"})
# Content-part types that hold chain-of-thought.
REASONING_PARTS: frozenset[str] = frozenset({"reasoning", "thinking"})
# Content-part types that hold a tool call (LLaMA-Factory's reason_tool_use layout).
TOOL_CALL_PARTS: frozenset[str] = frozenset({"tool_call", "function_call"})
# Values of CSV/Parquet cells that stand for a missing value (what pandas writes for NaN/None, and
# spreadsheet NULL markers): such a cell is no text to train on (pandas' default na_values, minus
# the empty string, which is blank anyway, and ``NA``, which is also an ordinary word).
NULL_MARKERS: frozenset[str] = frozenset(
    {"NaN", "nan", "-nan", "-NaN", "NULL", "null", "None", "N/A", "n/a", "#N/A", "#N/A N/A", "#NA", "<NA>", "NaT",
     "1.#QNAN", "-1.#QNAN", "1.#IND", "-1.#IND"})
# The per-turn loss weights a row may carry (LLaMA-Factory v1 ``loss_weight``): 1 = the turn is
# learned, 0 = it is context only. Training masks whole turns; fractional weights are refused.
LOSS_WEIGHTS: tuple[float, ...] = (0.0, 1.0)
# The keys each format reads from a row; any other key is counted as unknown (and reported).
KNOWN_KEYS: dict[str, frozenset[str]] = {
    "alpaca": frozenset({"instruction", "input", "output", "system", "chosen", "rejected", "label"}),
    "dolly": frozenset({"instruction", "context", "response", "category"}),
    "human_assistant": frozenset({"text"}),
    "messages": frozenset({"messages", "conversations", "system", "tools", "chosen", "rejected", "label"}),
    "self_instruct": frozenset({"instruction", "instances"}),
    "gsm8k": frozenset({"question", "answer", "instruction", "input", "output"}),
}
KNOWN_TURN_KEYS: frozenset[str] = frozenset(
    {"role", "from", "content", "value", "tool_calls", "tool_call_id", "name", "reasoning_content", "loss_weight"})
# GSM8K's calculator annotations: "48/2 = <<48/2=24>>24".
_CALC = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class ConvertOptions:
    """Per-source conversion options (``SourceConfig.reasoning`` / ``SourceConfig.preference``)."""

    reasoning: str = "keep"
    preference: str | None = None
_HA_SPLIT = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


class RowError(ValueError):
    """One row is bad; its message is the reason it is rejected (quarantined at ingestion)."""


# --------------------------------------------------------------------------- detection
def detect_format(objs: list[Any]) -> str | None:
    """Guess the format from the keys of the first records (majority vote); None when unknown."""
    votes: dict[str, int] = {}
    for o in objs[:50]:
        f = format_of(o)
        if f:
            votes[f] = votes.get(f, 0) + 1
    return max(votes, key=lambda k: votes[k]) if votes else None


def format_of(o: Any) -> str | None:
    """The format one row's keys say it is in, or None (also: a .json file holding one object is one record)."""
    if not isinstance(o, dict):
        return None
    keys = set(o)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if "question" in keys and "answer" in keys and isinstance(o["answer"], str) and "####" in o["answer"]:
        return "gsm8k"
    if "instruction" in keys and "instances" in keys:
        return "self_instruct"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "instruction" in keys and ("output" in keys or "chosen" in keys):
        return "alpaca"
    if "text" in keys and isinstance(o["text"], str) and _HA_SPLIT.search(o["text"]):
        return "human_assistant"
    return None


_EXPECTED = (
    "alpaca {instruction, input?, output}; dolly {instruction, context?, response}; "
    "human_assistant {text: '### Human: … ### Assistant: …'}; messages {messages|conversations: [...]}; "
    "self_instruct {instruction, instances: [{input, output}]}; gsm8k {question, answer: '… #### 72'}"
)



# --------------------------------------------------------------------------- converters
def _req_str(o: dict, key: str, *, optional: bool = False) -> str:
    if key not in o or o[key] is None:
        if optional:
            return ""
        if key in o:
            raise RowError(f"field {key!r} is null (expected a string)")
        raise RowError(f"missing required field {key!r}")
    v = o[key]
    if not isinstance(v, str):
        raise RowError(f"field {key!r} must be a string, got {type_name(v)}")
    return v


def _user_content(instruction: str, extra: str) -> str:
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()


def _preference_response(o: dict, opts: ConvertOptions, *, where: str) -> Any:
    """The ``chosen`` side of a preference row when ``preference: chosen``; RowError otherwise."""
    if opts.preference != "chosen":
        raise RowError("preference pair (`chosen`/`rejected`) has no single response to train on: set "
                       f"`preference: chosen` on the source to train on the chosen response{where}")
    if "chosen" not in o or o["chosen"] is None:
        raise RowError("preference row without `chosen` (expected the preferred response)")
    return o["chosen"]


def _check_kto_label(o: dict) -> None:
    """A KTO row (``label``) is a training target only when its label is true."""
    if "label" not in o:
        return
    label = o["label"]
    if not isinstance(label, bool):
        raise RowError(f"field 'label' must be true or false (a KTO desirability label), got {type_name(label)}")
    if not label:
        raise RowError("KTO row with label=false: the response is marked undesirable, so it is not a training "
                       "target (only label=true rows are kept)")


def _conv_alpaca(o: dict, opts: ConvertOptions) -> list[Any]:
    _check_kto_label(o)
    if "chosen" in o or "rejected" in o:
        instruction, inp = _req_str(o, "instruction"), _req_str(o, "input", optional=True)
        chosen = _preference_response(o, opts, where="")
        if not isinstance(chosen, str):
            raise RowError(f"field 'chosen' must be a string, got {type_name(chosen)}")
        out = chosen
    else:
        instruction, inp, out = _req_str(o, "instruction"), _req_str(o, "input", optional=True), _req_str(o, "output")
    system = _req_str(o, "system", optional=True)
    msgs = ([{"role": "system", "content": system.strip()}] if system.strip() else [])
    msgs += [{"role": "user", "content": _user_content(instruction, inp)}, {"role": "assistant", "content": out.strip()}]
    return [(msgs, "")]


def _conv_dolly(o: dict, opts: ConvertOptions) -> list[Any]:
    instruction, ctx, resp = _req_str(o, "instruction"), _req_str(o, "context", optional=True), _req_str(o, "response")
    cat = o.get("category") if isinstance(o.get("category"), str) else ""
    return [([{"role": "user", "content": _user_content(instruction, ctx)},
              {"role": "assistant", "content": resp.strip()}], cat)]


def _conv_human_assistant(o: dict, opts: ConvertOptions) -> list[Any]:
    text = _req_str(o, "text")
    parts = _HA_SPLIT.split(text)
    if len(parts) < 3:
        raise RowError("no '### Human:' / '### Assistant:' markers in `text`")
    if parts[0].strip():
        raise RowError("text before the first '### Human:' marker")
    msgs = [{"role": "user" if who.lower() == "human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]
    return [(msgs, "")]


def with_reasoning(answer: str, reasoning: str) -> str:
    """An assistant response with its chain-of-thought first: ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``."""
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{answer.strip()}" if reasoning.strip() else answer


def _content_parts(content: Any, where: str) -> tuple[str, str, list[Any]]:
    """(text, reasoning, tool calls) of a turn's content: a string, or a list of parts.

    Parts (LLaMA-Factory v1 / ShareGPT): ``{type: text|reasoning|thinking|tool_call, value|text: ...}``;
    a ``tool_call`` part's value is one call ``{name, arguments}`` (JSON text or an object) or a list of
    them. The calls come back raw, in order, for ``_normalize_calls`` (the one canonical tool-call shape).
    """
    if isinstance(content, str):
        return content, "", []
    if isinstance(content, list):  # [{type: text|reasoning|tool_call, value|text: ...}]
        out, thoughts, calls = [], [], []
        for k, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
                continue
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind == "text" or kind in REASONING_PARTS:
                val = part.get("value", part.get("text", part.get(kind)))
                if not isinstance(val, str):
                    raise RowError(f"{where}: {kind} part without a string `value`/`text`")
                (out if kind == "text" else thoughts).append(val)
            elif kind in TOOL_CALL_PARTS:
                val = part.get("value", part.get("text", part.get(kind, part.get("function"))))
                if val is None:
                    raise RowError(f"{where}: content part {k} ({kind}) has no `value` (expected a JSON "
                                   "{name, arguments} tool call)")
                val = _json_value(val, f"{where}: content part {k} ({kind})")
                calls.extend(val if isinstance(val, list) else [val])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError(f"{where}: unsupported content part of type {kind!r} (only text, reasoning and "
                               "tool_call parts are supported)")
        return "".join(out), "\n\n".join(t.strip() for t in thoughts if t.strip()), calls
    raise RowError(f"{where}: content must be a string or a list of text parts, got {type_name(content)}")


def _json_value(value: Any, what: str) -> Any:
    """``value`` parsed when it is a JSON string, else as it is; RowError naming ``what`` when unparseable."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise RowError(f"{what} is not valid JSON ({e})") from None


def _normalize_tools(raw: Any) -> str:
    """The canonical JSON of a ``tools`` field: a list of ``{name, description?, parameters?}`` ("" when none)."""
    tools = _json_value(raw, "`tools`")
    if tools in (None, "", []):
        return ""
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise RowError(f"`tools` must be a list of tool schemas (or its JSON string), got {type_name(tools)}")
    out = []
    for i, t in enumerate(tools):
        if isinstance(t, dict) and isinstance(t.get("function"), dict):  # OpenAI {type: function, function: {...}}
            t = t["function"]
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"].strip():
            raise RowError(f"`tools`[{i}]: expected a schema with a string `name`, got {type_name(t)}")
        out.append(t)
    return json.dumps(out, ensure_ascii=False)


def _normalize_calls(raw: Any, where: str) -> str:
    """The canonical JSON of tool calls: ``[{"name": str, "arguments": {...}}]`` (arguments parsed from JSON)."""
    calls = _json_value(raw, f"{where}: the tool call")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RowError(f"{where}: tool calls must be a JSON object {{name, arguments}} or a non-empty list of them, "
                       f"got {type_name(calls)}")
    out = []
    for k, c in enumerate(calls):
        if isinstance(c, dict) and isinstance(c.get("function"), dict):  # OpenAI {type: function, function: {...}}
            c = c["function"]
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"].strip():
            raise RowError(f"{where}: tool call {k} needs a string `name`, got {type_name(c)}")
        args = _json_value(c.get("arguments", c.get("parameters", {})), f"{where}: arguments of tool call {k}")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise RowError(f"{where}: arguments of tool call {k} must be a JSON object, got {type_name(args)}")
        out.append({"name": c["name"].strip(), "arguments": args})
    return json.dumps(out, ensure_ascii=False)


def _conv_messages(o: dict, opts: ConvertOptions) -> list[Any]:
    _check_kto_label(o)
    turns = o.get("messages", o.get("conversations"))
    if not isinstance(turns, list):
        raise RowError(f"`messages` must be a list of turns, got {type_name(turns)}")
    turns = list(turns)
    if "chosen" in o or "rejected" in o:
        chosen = _preference_response(o, opts, where="")
        if isinstance(chosen, str):
            chosen = {"role": "assistant", "content": chosen}
        turns += chosen if isinstance(chosen, list) else [chosen]
    msgs: list[dict] = []
    system = o.get("system")
    if isinstance(system, str) and system.strip():
        msgs.append({"role": "system", "content": system.strip()})
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(f"turn {i}: expected an object, got {type_name(t)}")
        role_raw = t.get("role", t.get("from"))
        if not isinstance(role_raw, str):
            raise RowError(f"turn {i}: missing `role`/`from`")
        key = role_raw.strip().lower()
        content = t["content"] if "content" in t else t.get("value")
        if key in TOOL_CALL_ROLES:  # ShareGPT: the whole value is the call(s)
            if content is None:
                raise RowError(f"turn {i}: missing `content`/`value`")
            msg = {"role": "assistant", "content": "", "tool_calls": _normalize_calls(content, f"turn {i}")}
            _put_loss_weight(msg, t, i)
            msgs.append(msg)
            continue
        role = "tool" if key in TOOL_RESULT_ROLES else ROLE_ALIASES.get(key)
        if role is None:
            raise RowError(f"turn {i}: unsupported role {role_raw!r} (expected user/assistant/system or "
                           "human/gpt, function_call/observation, tool)")
        calls = t.get("tool_calls") if role == "assistant" else None
        if content is None and not calls:
            raise RowError(f"turn {i}: missing `content`/`value`")
        text, reasoning, part_calls = _content_parts(content if content is not None else "", f"turn {i}")
        extra = t.get("reasoning_content")
        if isinstance(extra, str) and extra.strip():
            reasoning = f"{extra.strip()}\n\n{reasoning}".strip()
        if reasoning and role != "assistant":
            raise RowError(f"turn {i}: a reasoning part is only allowed in an assistant turn")
        if part_calls and role != "assistant":
            raise RowError(f"turn {i}: a tool_call part is only allowed in an assistant turn (got a {role} turn)")
        text = text.strip()
        if reasoning and opts.reasoning == "keep":
            # A turn that only calls tools keeps its reasoning as its content: <think>…</think>, then the calls.
            text = with_reasoning(text, reasoning).rstrip()
        msg = {"role": role, "content": text}
        if part_calls:  # tool_call content parts (and any ``tool_calls`` beside them), in order
            raw_calls = (_json_value(calls, f"turn {i}: the tool call") if calls else [])
            raw_calls = raw_calls if isinstance(raw_calls, list) else [raw_calls]
            calls = list(raw_calls) + part_calls
        if calls:
            msg["tool_calls"] = _normalize_calls(calls, f"turn {i}")
        _put_loss_weight(msg, t, i)
        msgs.append(msg)
    learned = [m.get("loss_weight", 1.0) for m in msgs if m["role"] == "assistant"]
    if learned and not any(learned):
        raise RowError("every assistant turn has loss_weight 0: the conversation has nothing to learn "
                       "(give at least one assistant turn loss_weight 1)")
    tools = _normalize_tools(o.get("tools"))
    return [(msgs, "", {"tools": tools})] if tools else [(msgs, "")]


def _put_loss_weight(msg: dict, turn: dict, i: int) -> None:
    """Carry a turn's ``loss_weight`` into the canonical turn where it changes what is learned.

    Only assistant turns are learned: ``loss_weight: 0`` on one keeps it as context only (stored as
    ``loss_weight: 0.0``; training gives its tokens label -100); 1 is the default (not stored, so a
    row that spells out the defaults, as LLaMA-Factory's v1 sets do, is the same record as without).
    On any other turn 0 is the default; 1 (learning a user/system/tool turn) and fractional weights
    are refused, naming the turn, since training masks whole assistant turns and cannot weigh them.
    """
    if "loss_weight" not in turn or turn["loss_weight"] is None:
        return
    w = turn["loss_weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or float(w) not in LOSS_WEIGHTS:
        raise RowError(f"turn {i}: loss_weight {w!r} is not supported (expected 0 = no loss on this turn or "
                       "1 = learned; whole turns are masked, weights in between cannot be honoured)")
    if msg["role"] == "assistant":
        if float(w) == 0.0:
            msg["loss_weight"] = 0.0
    elif float(w) != 0.0:
        raise RowError(f"turn {i}: loss_weight {w!r} on a {msg['role']} turn: only assistant turns are learned "
                       "(expected 0 or no loss_weight on it)")


def _conv_self_instruct(o: dict, opts: ConvertOptions) -> list[Any]:
    instruction = _req_str(o, "instruction")
    inst = o.get("instances")
    if not isinstance(inst, list) or not inst:
        raise RowError("`instances` must be a non-empty list of {input, output}")
    out: list[Any] = []
    for i, x in enumerate(inst):
        if not isinstance(x, dict):
            raise RowError(f"instance {i}: expected an object, got {type_name(x)}")
        try:
            inp, res = _req_str(x, "input", optional=True), _req_str(x, "output")
        except RowError as e:
            # One bad instance is quarantined alone; the task's other instances go on.
            out.append(e)
            continue
        out.append(([{"role": "user", "content": _user_content(instruction, inp)},
                     {"role": "assistant", "content": res.strip()}], ""))
    return out


def _conv_gsm8k(o: dict, opts: ConvertOptions) -> list[Any]:
    """GSM8K: question -> worked solution ending ``#### <final>``; the final answer into ``answer``."""
    if "question" in o:
        question, solution = _req_str(o, "question"), _req_str(o, "answer")
    else:  # the Alpaca-shaped copy (gsm8k_train_7473.json): {instruction, input, output}, no "####"
        question = _user_content(_req_str(o, "instruction"), _req_str(o, "input", optional=True))
        solution = _req_str(o, "output")
    solution = _CALC.sub("", solution).strip()
    final = extract_final_answer(solution)
    if final is None:
        raise RowError("no final answer in the solution (expected a last line '#### <answer>' or a final number)")
    if "####" in solution:
        reasoning, _, shown = solution.rpartition("####")
        response = f"{reasoning.rstrip()}\n#### {shown.strip()}" if reasoning.strip() else f"#### {shown.strip()}"
    else:
        response = f"{solution}\n#### {final}"
    return [([{"role": "user", "content": question.strip()}, {"role": "assistant", "content": response}], "",
             {"answer": final})]


# A converter returns one item per record the row yields: (messages, category[, meta]) or a RowError;
# ``meta`` holds record metadata (``tools``, ``answer``).
CONVERTERS: dict[str, Callable[[dict, ConvertOptions], list[Any]]] = {
    "alpaca": _conv_alpaca,
    "dolly": _conv_dolly,
    "human_assistant": _conv_human_assistant,
    "messages": _conv_messages,
    "self_instruct": _conv_self_instruct,
    "gsm8k": _conv_gsm8k,
}


def _check_tool_conversation(msgs: list[dict], *, max_chars: int | None) -> None:
    """``check_messages`` for a conversation with tool calls/results.

    Order: [system] user, then assistant turns; an assistant turn with ``tool_calls`` is followed by
    one or more ``tool`` results (or ends the conversation: the call is the target), the results by
    an assistant turn; a plain assistant turn by a user turn. The last turn is the assistant's.
    """
    roles = [m["role"] for m in msgs]
    if "system" in roles[1:]:
        raise RowError("a system turn is only allowed first")
    body = [m for m in msgs if m["role"] != "system"]
    if not body or body[0]["role"] != "user":
        raise RowError("conversation must start with a user turn")
    if body[-1]["role"] != "assistant":
        raise RowError("conversation must end with an assistant turn (or an assistant tool call)")
    for prev, cur in zip(body, body[1:]):
        calls = prev["role"] == "assistant" and bool(prev.get("tool_calls"))
        if cur["role"] == "tool" and not (calls or prev["role"] == "tool"):
            raise RowError("a tool result (observation) must follow an assistant tool call")
        if calls and cur["role"] != "tool":
            raise RowError("an assistant tool call must be followed by its tool result (observation)")
        if prev["role"] == "user" and cur["role"] != "assistant":
            raise RowError("a user turn must be followed by an assistant turn")
        if prev["role"] == "assistant" and not calls and cur["role"] != "user":
            raise RowError("user and assistant turns must alternate")
    for m in msgs:
        text = m["content"] + m.get("tool_calls", "")
        if is_blank(text):
            what = {"user": "instruction", "assistant": "response", "tool": "tool result"}.get(m["role"], "system prompt")
            raise RowError(f"empty {what} (blank, whitespace-only or invisible-characters-only {m['role']} turn)")
        if has_lone_surrogate(text):
            raise RowError(f"invalid text in the {m['role']} turn: a lone UTF-16 surrogate (from invalid UTF-8 "
                           "or an unpaired \\ud800-\\udfff escape)")
    total = sum(len(m["content"]) + len(m.get("tool_calls", "")) for m in msgs)
    if max_chars is not None and total > max_chars:
        raise RowError(f"record too long: {total} chars > max_record_chars={max_chars}")


def check_messages(msgs: list[dict], *, max_chars: int | None = None) -> None:
    """Raise RowError when a conversation is not trainable (blank turn, bad order, too long, bad UTF-8).

    ``max_chars``: the longest a conversation may be (all turns together); None: no bound.
    A conversation with tool calls or tool results follows the tool-calling order instead
    (``_check_tool_conversation``).
    """
    if any(m["role"] == "tool" or m.get("tool_calls") for m in msgs):
        _check_tool_conversation(msgs, max_chars=max_chars)
        return
    roles = [m["role"] for m in msgs]
    body = [r for r in roles if r != "system"]
    if "system" in roles[1:]:
        raise RowError("a system turn is only allowed first")
    if not body or body[0] != "user":
        raise RowError("conversation must start with a user turn")
    if body[-1] != "assistant":
        raise RowError("conversation must end with an assistant turn")
    if any(a == b for a, b in zip(body, body[1:])):
        raise RowError("user and assistant turns must alternate")
    for m in msgs:
        if is_blank(m["content"]):
            what = "instruction" if m["role"] == "user" else ("response" if m["role"] == "assistant" else "system prompt")
            raise RowError(f"empty {what} (blank, whitespace-only or invisible-characters-only {m['role']} turn)")
        if has_lone_surrogate(m["content"]):
            raise RowError(f"invalid text in the {m['role']} turn: a lone UTF-16 surrogate (from invalid UTF-8 "
                           "or an unpaired \\ud800-\\udfff escape)")
    total = sum(len(m["content"]) for m in msgs)
    if max_chars is not None and total > max_chars:
        raise RowError(f"record too long: {total} chars > max_record_chars={max_chars}")



# --------------------------------------------------------------------------- loading
# The keys a row of each format cannot do without (one of each tuple).
_REQUIRED_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "alpaca": (("instruction",), ("output",)),
    "dolly": (("instruction",), ("response",)),
    "human_assistant": (("text",),),
    "messages": (("messages", "conversations"),),
    "self_instruct": (("instruction",), ("instances",)),
    "gsm8k": (("question", "instruction"), ("answer", "output")),
}


@dataclass(frozen=True)
class ConvertedRow:
    """One conversation a file yielded: where it was (``row``), its messages, its category ("" when none),
    its tool schemas (JSON, "" when none) and its final answer (verifiable tasks, "" when none)."""

    row: int
    messages: list[dict[str, str]]
    category: str = ""
    tools: str = ""
    answer: str = ""


@dataclass(frozen=True)
class RejectedRow:
    """One row (or Self-Instruct instance) that yields no conversation, with the reason and its raw text."""

    row: int
    reason: str
    raw: str


@dataclass(frozen=True)
class LoadedRecords:
    """What ``load_records`` / ``convert_rows`` made of one file.

    Attributes:
        path: the file (or hub id) read.
        format: the format applied (``auto`` only when no row parsed, so every row is rejected).
        detected: the format was detected (``format="auto"``), not given.
        sha256: sha256 of the bytes parsed ("" for a hub dataset).
        records: the converted rows, in file order.
        rejected: the rejected rows, in file order; ``read = len(records) + len(rejected)``.
        unknown_keys: ``(key, rows)`` for every key the rows carry that the format does not read
            (turn-level keys as ``turn.<key>``), sorted by key: what conversion ignored.
        encoding: how the file's text was decoded (``sftflow.data.readers.FileRows.encoding``).
    """

    path: str
    format: str
    detected: bool
    sha256: str
    records: tuple[ConvertedRow, ...]
    rejected: tuple[RejectedRow, ...]
    unknown_keys: tuple[tuple[str, int], ...] = ()
    encoding: str = "utf-8"  # the text encoding decoded (e.g. "utf-16-le (no byte-order mark)"); "" when binary

    @property
    def read(self) -> int:
        """Rows read (a Self-Instruct task counts one per instance): converted + rejected."""
        return len(self.records) + len(self.rejected)


def canonical_format(fmt: str) -> str:
    """``fmt`` with aliases resolved; raises ValueError naming the known formats for an unknown one."""
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS + tuple(FORMAT_ALIASES))}")
    return fmt


def convert_row(obj: Any, fmt: str, *, max_record_chars: int | None = None,
                options: ConvertOptions = ConvertOptions()) -> list[list[dict[str, str]] | RowError]:
    """One parsed row in ``fmt`` -> one item per conversation it yields: its messages, or the RowError why not.

    Self-Instruct yields one item per instance; every other format one item.
    """
    items: list[list[dict[str, str]] | RowError] = []
    for item in _convert(obj, canonical_format(fmt), options):
        if isinstance(item, RowError):
            items.append(item)
            continue
        try:
            check_messages(item[0], max_chars=max_record_chars)
            items.append(item[0])
        except RowError as e:
            items.append(e)
    return items


def _convert(obj: Any, fmt: str, options: ConvertOptions = ConvertOptions()) -> list[Any]:
    if not isinstance(obj, dict):
        raise RowError(f"expected a JSON object, got {type_name(obj)}")
    return CONVERTERS[fmt](obj, options)


def unknown_keys(obj: Any, fmt: str) -> set[str]:
    """The keys of one row that format ``fmt`` does not read (turn-level ones as ``turn.<key>``)."""
    if not isinstance(obj, dict) or fmt not in KNOWN_KEYS:
        return set()
    out = {str(k) for k in obj if k not in KNOWN_KEYS[fmt]}
    if fmt == "messages":
        turns = obj.get("messages", obj.get("conversations"))
        for t in turns if isinstance(turns, list) else ():
            if isinstance(t, dict):
                out.update(f"turn.{k}" for k in t if k not in KNOWN_TURN_KEYS)
    return out


def _rename(obj: Any, columns: dict[str, str] | None) -> Any:
    if not columns or not isinstance(obj, dict):
        return obj
    return {columns.get(k, k): v for k, v in obj.items()}


def _check_columns(label: str, fmt: str, objs: list[Any], in_where: str) -> None:
    """A table (CSV, Parquet, saved dataset) without a column the format needs is a file error,
    not thousands of identical rejected rows."""
    cols = next((set(o) for o in objs if isinstance(o, dict)), None)
    if cols is None:
        return
    missing = [" or ".join(alts) for alts in _REQUIRED_KEYS[fmt] if not any(a in cols for a in alts)]
    if missing:
        raise IngestError(f"{label}: no column {', '.join(repr(m) for m in missing)} for format {fmt!r} "
                          f"(columns: {sorted(cols)[:20]}); expected {fmt} columns, or map yours with `columns:`"
                          f"{in_where}")


def convert_rows(rows: Sequence[RawRow], *, label: str, format: str = "auto", tabular: bool = False,
                 columns: dict[str, str] | None = None, max_record_chars: int | None = None,
                 sha256: str = "", where: str = "", reasoning: str = "keep",
                 preference: str | None = None) -> LoadedRecords:
    """Convert the raw rows of one file (or hub dataset): detect the format, convert, check each conversation.

    Accounting: every row becomes exactly one converted or one rejected row (a Self-Instruct
    task: one per instance).

    Args:
        rows: the raw rows (``sftflow.data.readers``).
        label: the file path or hub id, for messages.
        format: ``auto`` or a format name (or alias).
        tabular: every row has the same columns (a missing column is then a file error).
        columns: renames applied to every row first (``{their_name: our_name}``).
        max_record_chars: longest conversation kept (all turns); None: no bound.
        sha256: digest of the bytes the rows were parsed from (carried into the result).
        where: the config entry to fix, for messages (e.g. ``the source 'dolly'``).
        reasoning: ``keep`` (reasoning parts become ``<think>…</think>`` before the answer) or ``drop``.
        preference: ``chosen`` trains preference (DPO) rows on their chosen response; None rejects them.

    Raises:
        IngestError: the format cannot be detected, a table lacks a needed column, or there are no rows.
    """
    in_where = f" in {where}" if where else ""
    objs = [_rename(r.obj, columns) for r in rows]
    parsed = [o for r, o in zip(rows, objs) if r.error is None]
    fmt = canonical_format(format)
    detected = False
    if fmt == "auto" and parsed:
        found = detect_format(parsed)
        if found is None:
            keys = sorted({k for o in parsed[:50] if isinstance(o, dict) for k in o})[:20]
            kinds = sorted({type_name(o) for o in parsed[:50] if not isinstance(o, dict)})
            got_what = f"keys {keys}" if keys else f"rows that are not objects: {kinds}"
            raise IngestError(f"{label}: unknown format ({got_what}); expected one of {_EXPECTED}. "
                              f"Set `format:` or map columns with `columns:`{in_where}.")
        fmt, detected = found, True
    if fmt != "auto" and tabular:
        _check_columns(label, fmt, parsed, in_where)
    # fmt stays "auto" only when no row parsed at all: every row is rejected with its own error.
    if reasoning not in ("keep", "drop"):
        raise ValueError(f"reasoning={reasoning!r}: expected 'keep' or 'drop'")
    options = ConvertOptions(reasoning=reasoning, preference=preference)
    records: list[ConvertedRow] = []
    rejected: list[RejectedRow] = []
    unknown: Counter[str] = Counter()
    for r, o in zip(rows, objs):
        if r.error is None:
            unknown.update(unknown_keys(o, fmt))
        try:
            if r.error is not None:
                raise RowError(r.error)
            if tabular:
                _check_null_cells(o, fmt)
            items, per_instance = _convert(o, fmt, options), fmt == "self_instruct"
        except RowError as e:
            items, per_instance = [e], False
        for k, item in enumerate(items):
            try:
                if isinstance(item, RowError):
                    raise item
                msgs, cat, *rest = item
                meta = rest[0] if rest else {}
                check_messages(msgs, max_chars=max_record_chars)
            except RowError as e:
                rejected.append(RejectedRow(r.row, f"instance {k}: {e}" if per_instance else str(e), r.raw))
                continue
            records.append(ConvertedRow(r.row, msgs, cat or "", tools=meta.get("tools", ""),
                                        answer=meta.get("answer", "")))
    if not records and not rejected:
        kind = Path(label).name.rsplit(".", 1)[-1].upper()
        raise IngestError(f"{label}: no records (only blank lines); expected {kind} records")
    return LoadedRecords(path=label, format=fmt, detected=detected, sha256=sha256,
                         records=tuple(records), rejected=tuple(rejected),
                         unknown_keys=tuple(sorted(unknown.items())))


def _check_null_cells(o: Any, fmt: str) -> None:
    """RowError when a text cell of a table row is a missing-value marker (``NaN``, ``NULL``, ``None``...).

    A CSV written by pandas spells a missing value ``nan``/``NaN``; spreadsheets write ``NULL`` or
    ``#N/A``. Read as text, such a row would train the model to answer "nan". Only the columns the
    format reads as text are checked (``category`` and ``label`` are metadata).
    """
    if not isinstance(o, dict):
        return
    for key in sorted(KNOWN_KEYS.get(fmt, ()) - {"category", "label"}):
        v = o.get(key)
        if isinstance(v, str) and v.strip() in NULL_MARKERS:
            raise RowError(f"column {key!r} holds {v.strip()!r}, a missing-value marker, not text (expected text; "
                           "fill the cell or drop the row)")


def line_limit(max_record_chars: int | None) -> int:
    """Longest raw line/row parsed at all: a record's bound with room for JSON syntax and escapes."""
    return sys.maxsize if max_record_chars is None else max_record_chars * 4 + 1024


def load_records(path: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None,
                 max_record_chars: int | None = None, split: str = "train", where: str = "",
                 reasoning: str = "keep", preference: str | None = None) -> LoadedRecords:
    """Read one file and convert every row to canonical messages: the one entry point for instruction files.

    Args:
        path: a .json/.jsonl/.ndjson/.csv/.parquet file, or a ``datasets.save_to_disk`` folder.
        format: ``auto`` (detected from the rows' keys) or one of ``FORMATS`` (or ``FORMAT_ALIASES``).
        columns: renames applied to every row before conversion (``{their_name: our_name}``).
        max_record_chars: longest conversation kept (all turns); longer rows are rejected. None: no bound.
        split: the split to read from a saved ``DatasetDict``.
        where: the config entry to fix, for messages (e.g. ``evaluation.extra_sets[my_set]``).
        reasoning: ``keep`` or ``drop`` reasoning content parts (see the module docstring).
        preference: ``chosen`` to train preference rows on their chosen response (else rejected).

    Returns:
        LoadedRecords: converted rows, rejected rows (with reasons), the format and the sha256 of the bytes read.

    Raises:
        IngestError: the file is missing or unusable as a whole (unreadable, empty, not JSON, not
            UTF-8, unknown format, a table without a column its format needs).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise IngestError(f"{p}: file not found" + (f" ({where})" if where else ""))
    got = read_file(p, max_line_chars=line_limit(max_record_chars), split=split,
                    is_record=lambda obj: format_of(obj) is not None)
    loaded = convert_rows(got.rows, label=str(p), format=format, tabular=got.tabular, columns=columns,
                          max_record_chars=max_record_chars, sha256=got.sha256, where=where, reasoning=reasoning,
                          preference=preference)
    return dataclasses.replace(loaded, encoding=got.encoding)
