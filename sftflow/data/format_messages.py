"""The conversation format (``messages``): ShareGPT / LLaMA-Factory / OpenAI turns, tool calls, loss weights.

One converter, ``convert_messages``, for rows ``{messages|conversations: [{role|from, content|value}],
system?, tools?}`` (format ``messages``, alias ``sharegpt``; see ``sftflow.data.formats`` for the table of
every format), and the one check that a canonical conversation is trainable, ``check_messages``
(every format's records go through it). What is here:

* role names: ``ROLE_ALIASES`` (human/gpt/... -> user/assistant/system), the ShareGPT tool-call and
  tool-result roles, the content-part types that hold reasoning or a tool call;
* content parts (``[{type: text|reasoning|tool_call, value|text}]``) and ``with_reasoning``
  (chain-of-thought kept as ``<think>…</think>`` before the answer);
* the canonical JSON of tool schemas (``tools``) and of tool calls (``[{name, arguments}]``), from the
  ShareGPT (LLaMA-Factory) and the OpenAI layouts;
* per-turn ``loss_weight`` (LLaMA-Factory v1: 0 = context only, 1 = learned);
* ``check_messages``: turn order (plain, or the tool-calling order), blank turns, lone surrogates, length.
"""

from __future__ import annotations

import json
from typing import Any

from sftflow.data.format_rows import ConvertOptions, RowError, check_kto_label, preference_response
from sftflow.data.readers import type_name
from sftflow.data.records import has_lone_surrogate, is_blank

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
# The per-turn loss weights a row may carry (LLaMA-Factory v1 ``loss_weight``): 1 = the turn is
# learned, 0 = it is context only. Training masks whole turns; fractional weights are refused.
LOSS_WEIGHTS: tuple[float, ...] = (0.0, 1.0)


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


def _named_function(item: Any) -> dict | None:
    """``item`` as a ``{name, ...}`` object, OpenAI's ``{type: function, function: {...}}`` unwrapped;
    None when it is not an object with a non-blank string ``name`` (a tool schema and a tool call alike)."""
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]
    if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"].strip():
        return item
    return None


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
    for i, raw_tool in enumerate(tools):
        t = _named_function(raw_tool)
        if t is None:
            raise RowError(f"`tools`[{i}]: expected a schema with a string `name`, got {type_name(raw_tool)}")
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
    for k, raw_call in enumerate(calls):
        c = _named_function(raw_call)
        if c is None:
            raise RowError(f"{where}: tool call {k} needs a string `name`, got {type_name(raw_call)}")
        args = _json_value(c.get("arguments", c.get("parameters", {})), f"{where}: arguments of tool call {k}")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise RowError(f"{where}: arguments of tool call {k} must be a JSON object, got {type_name(args)}")
        out.append({"name": c["name"].strip(), "arguments": args})
    return json.dumps(out, ensure_ascii=False)


def convert_messages(o: dict, opts: ConvertOptions) -> list[Any]:
    """A ``messages``/``conversations`` row (ShareGPT, LLaMA-Factory, OpenAI; tools, preference, KTO) -> one record.

    The record's meta carries the canonical ``tools`` JSON when the row has tool schemas.
    """
    check_kto_label(o)
    turns = o.get("messages", o.get("conversations"))
    if not isinstance(turns, list):
        raise RowError(f"`messages` must be a list of turns, got {type_name(turns)}")
    turns = list(turns)
    if "chosen" in o or "rejected" in o:
        chosen = preference_response(o, opts, where="")
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


def check_messages(msgs: list[dict], *, max_chars: int | None = None) -> None:
    """Raise RowError when a conversation is not trainable (blank turn, bad order, too long, bad UTF-8).

    ``max_chars``: the longest a conversation may be (all turns together); None: no bound.
    A conversation with tool calls or tool results follows the tool-calling order
    (``_check_tool_order``); any other alternates user and assistant turns.
    """
    tools = any(m["role"] == "tool" or m.get("tool_calls") for m in msgs)
    roles = [m["role"] for m in msgs]
    if "system" in roles[1:]:
        raise RowError("a system turn is only allowed first")
    body = [m for m in msgs if m["role"] != "system"]
    if not body or body[0]["role"] != "user":
        raise RowError("conversation must start with a user turn")
    if body[-1]["role"] != "assistant":
        raise RowError("conversation must end with an assistant turn" + (" (or an assistant tool call)" if tools else ""))
    if tools:
        _check_tool_order(body)
    elif any(a["role"] == b["role"] for a, b in zip(body, body[1:])):
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


def _check_tool_order(body: list[dict]) -> None:
    """The tool-calling order of a conversation's non-system turns (``body``, user first, assistant last).

    An assistant turn with ``tool_calls`` is followed by one or more ``tool`` results (or ends the
    conversation: the call is the target), the results by an assistant turn; a plain assistant turn
    by a user turn.
    """
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
