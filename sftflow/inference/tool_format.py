"""Tool calling in the prompt format: tool schemas, calls and results, read and rendered as text or for a template.

``sftflow.inference.formatting`` (the one prompt format) hands a conversation here when it has tool
schemas, tool calls or ``tool`` turns (``is_tool_conversation``); a conversation without them never
reaches this module. What is here:

* reading the record's ``tools`` / ``tool_calls`` fields (JSON text or lists; OpenAI's
  ``{type: function, function: {...}}`` unwrapped): ``tools_of``, ``calls_of``;
* the text fallback (``tool_text_fallback``: ``<tool_call>`` / ``<tool_response>`` lines in plain
  turns) for templates that cannot render tools, and ``assistant_text`` (an assistant turn as text,
  what evaluation compares generations with);
* what a native template that renders tools needs: ``supports_tools``, ``hf_tool_messages`` (the
  transformers convention) and ``native_tool_render_kwargs`` (refuses control-token text in calls
  or schemas);
* ``check_tool_messages``: the order rules of a tool conversation.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

# Text fallback for templates without tool support (gemma, chatml, a native template that never
# mentions tools). It turns a tool conversation into plain system/user/assistant turns, so the
# ordinary path renders it and the usual mask applies:
#   * the tool schemas go at the end of the system turn (one JSON object per line inside
#     <tools>…</tools>, with one sentence saying how to call them); a system turn is added if
#     there is none (Gemma folds it into the first user turn as always);
#   * each assistant call is a line ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``
#     after the assistant's text, inside the assistant turn: learned, like the answer;
#   * the tool results following a call form one user-side turn, each result wrapped in
#     ``<tool_response>\n…\n</tool_response>``: context, never learned.
# The markers are plain text (never special tokens), so generation produces them as text too.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_PREAMBLE = (
    "You can call the tools below (JSON schemas). To call one, reply with a line "
    '<tool_call>{"name": <tool name>, "arguments": <JSON object>}</tool_call> per call; '
    "each result comes back inside <tool_response></tool_response>."
)


def _parse_json_field(value: Any) -> Any:
    """A JSON-string field parsed (Parquet stores ``tool_calls``/``tools`` as JSON text); None when empty."""
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return None
    if isinstance(value, str):
        return json.loads(value) if value.strip() else None
    return list(value) if not isinstance(value, (dict, list)) else value


def calls_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A turn's tool calls as ``[{"name", "arguments"}]`` (OpenAI ``{function: {...}}`` unwrapped)."""
    calls = _parse_json_field(message.get("tool_calls"))
    if not calls:
        return []
    out = []
    for c in calls if isinstance(calls, list) else [calls]:
        c = c["function"] if isinstance(c, dict) and isinstance(c.get("function"), dict) else c
        args = c.get("arguments", {})
        out.append({"name": c["name"], "arguments": json.loads(args) if isinstance(args, str) else args})
    return out


def tools_of(tools: Any) -> list[dict[str, Any]]:
    """Tool schemas as a list of ``{name, description, parameters}`` (OpenAI wrapper unwrapped)."""
    parsed = _parse_json_field(tools)
    if not parsed:
        return []
    parsed = parsed if isinstance(parsed, list) else [parsed]
    return [t["function"] if isinstance(t, dict) and isinstance(t.get("function"), dict) else t for t in parsed]


def is_tool_conversation(messages: Sequence[dict[str, Any]], tools: Any = None) -> bool:
    """True when a conversation has tool schemas, tool calls or tool results (the tool rendering applies)."""
    return bool(tools_of(tools)) or any(m.get("role") == "tool" or calls_of(m) for m in messages)


def supports_tools(tokenizer: Any) -> bool:
    """True when the tokenizer's own chat template renders tools (it uses both ``tools`` and ``tool_calls``)."""
    tpl = getattr(tokenizer, "chat_template", None)
    return isinstance(tpl, str) and "tools" in tpl and "tool_calls" in tpl


def tool_call_text(calls: Sequence[dict[str, Any]]) -> str:
    """The fallback text of tool calls: one ``<tool_call>{"name": …, "arguments": …}</tool_call>`` line each."""
    return "\n".join(f"{TOOL_CALL_OPEN}{json.dumps({'name': c['name'], 'arguments': c['arguments']}, ensure_ascii=False)}"
                     f"{TOOL_CALL_CLOSE}" for c in calls)


def assistant_text(message: dict[str, Any]) -> str:
    """What an assistant turn says, as text: its content, then its tool calls as fallback lines.

    Evaluation compares generations with this (a turn that only calls a tool has empty content;
    its reference is the call the model should make).
    """
    calls = calls_of(message)
    content = str(message.get("content", ""))
    if not calls:
        return content
    return "\n".join(x for x in (content.strip(), tool_call_text(calls)) if x)


def tool_text_fallback(messages: Sequence[dict[str, Any]], tools: Any = None) -> list[dict[str, str]]:
    """A tool conversation as plain system/user/assistant turns (the documented text fallback above)."""
    schemas = tools_of(tools)
    out: list[dict[str, str]] = []
    if schemas:
        block = TOOLS_PREAMBLE + "\n<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in schemas) + "\n</tools>"
        first = messages[0] if messages else None
        if first is not None and first.get("role") == "system" and str(first["content"]).strip():
            out.append({"role": "system", "content": f"{first['content']}\n\n{block}"})
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        role, content = str(m["role"]), str(m["content"])
        if role == "system":
            if not schemas:
                out.append({"role": "system", "content": content})
            continue
        if role == "tool":
            wrapped = f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + wrapped
            else:
                out.append({"role": "user", "content": wrapped, "_tool": "1"})
            continue
        calls = calls_of(m)
        if role == "assistant" and calls:
            content = "\n".join(x for x in (content.strip(), tool_call_text(calls)) if x)
        turn = {"role": role, "content": content}
        if role == "assistant" and m.get("loss_weight") is not None:
            turn["loss_weight"] = m["loss_weight"]  # a context-only turn stays context only
        out.append(turn)
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


def hf_tool_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages in the transformers chat-template convention for tools (OpenAI-style ``tool_calls``)."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": str(m["role"]), "content": str(m["content"])}
        calls = calls_of(m)
        if calls:
            d["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        out.append(d)
    return out


def check_tool_messages(msgs: list[dict[str, Any]], *, for_generation: bool) -> None:
    """The order rules of a tool conversation (as ``sftflow.data.format_messages.check_messages`` checks at ingestion)."""
    body = [m for m in msgs if m["role"] != "system"]
    if any(m["role"] == "system" for m in msgs[1:]):
        raise ValueError("a system message may only come first")
    if not body or body[0]["role"] != "user":
        raise ValueError("conversation must start with a user turn (after an optional system turn)")
    for i, m in enumerate(msgs):
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}].role: must be system|user|assistant|tool (got {m['role']!r})")
    for prev, cur in zip(body, body[1:]):
        called = prev["role"] == "assistant" and bool(calls_of(prev))
        if cur["role"] == "tool" and not (called or prev["role"] == "tool"):
            raise ValueError("a tool message must follow an assistant message with tool_calls")
        if called and cur["role"] != "tool":
            raise ValueError("an assistant message with tool_calls must be followed by tool messages")
        if cur["role"] == prev["role"] and cur["role"] != "tool":
            raise ValueError(f"turns must alternate; two {cur['role']!r} turns in a row")
    if for_generation and body[-1]["role"] not in ("user", "tool"):
        raise ValueError("a generation prompt must end with a user or tool turn")
    if not for_generation and not any(m["role"] == "assistant" for m in body):
        raise ValueError("a training conversation needs at least one assistant turn")


def _control_texts(tokenizer: Any) -> list[str]:
    """Strings the tokenizer turns into special/added control tokens."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    texts.update(t.content for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
                 if getattr(t, "special", False))
    return sorted(t for t in texts if t)


def native_tool_render_kwargs(tokenizer: Any, msgs: list[dict[str, Any]], tools: Any) -> dict[str, Any]:
    """``apply_chat_template`` extras for a native template with tool support, after a safety check.

    Tool calls and schemas are rendered by the template itself (e.g. ``| tojson``), so they are
    tokenized as template text: a control token spelled inside them would become a real one. Such
    a conversation is refused rather than rendered.
    """
    schemas = tools_of(tools)
    data = json.dumps([calls_of(m) for m in msgs] + [schemas], ensure_ascii=False)
    bad = [t for t in _control_texts(tokenizer) if t in data]
    if bad:
        raise ValueError(f"tool calls or tool schemas contain control-token text {bad[:3]}; they would be rendered "
                         "as template control tokens (remove them from the data)")
    return {"tools": [{"type": "function", "function": t} for t in schemas]} if schemas else {}
