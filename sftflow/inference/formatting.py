"""ONE prompt formatting, shared by training, backtranslation and evaluation.

Three templates:

``gemma`` (default for models without a chat template, e.g. the Gemma 3 270M base)::

    <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{assistant}<end_of_turn>\\n

  Gemma has no system role: a system prompt is folded into the first user turn.

``chatml``::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{assistant}<|im_end|>\\n

``native``: the tokenizer's own ``chat_template`` (e.g. SmolLM2-Instruct's). The assistant mask is
derived by rendering the conversation prefix by prefix, so any template whose renderings are
prefixes of each other works. The template is also rendered around placeholders to find where each
message's text sits: template text is tokenized normally (its control tokens stay control tokens)
and message text with ``split_special_tokens=True``, so a ``<|im_end|>`` typed by a user is
ordinary text. A template that rewrites message text beyond trimming it is refused with a clear
error rather than silently letting data forge control tokens.

For ``gemma``/``chatml`` every piece (markers, role names, contents) is tokenized on its own and the
ids concatenated: the ids of a generation prompt are then *exactly* a prefix of the training ids
(no BPE merge across a turn boundary can make train and inference disagree), and text inside a
message is tokenized with ``split_special_tokens`` so a literal ``<end_of_turn>`` in user data can
never forge a turn marker.

Training labels are ``-100`` on system/user turns and template tokens; the assistant content and its
end-of-turn marker are learned, so the model learns to stop. An assistant turn carrying
``loss_weight: 0`` (the canonical record's per-turn weight, e.g. from LLaMA-Factory's v1 sets) is
context only: all its tokens get ``-100`` too.

Tool calling (additive: a conversation without tools, tool calls or ``tool`` turns renders exactly
as above). Messages may carry role ``tool`` (a tool's result) and assistant messages
``tool_calls`` (JSON text or a list of ``{name, arguments}``, OpenAI ``{type, function}`` accepted);
``tools`` (JSON text or a list of schemas) is a keyword argument. A ``native`` template that renders
tools (``supports_tools``: it uses ``tools`` and ``tool_calls``) renders them itself; every other
template gets the text fallback of ``tool_text_fallback`` (schemas in the system turn, calls as
``<tool_call>{...}</tool_call>`` lines in the assistant turn, results as a user-side
``<tool_response>`` turn). Either way the assistant's calls and answers are learned and tool results
never are. The tool parts (fields, text fallback, order rules) live in ``sftflow.inference.tool_format``;
the two entry points that render a tool conversation with this module's encoders stay here.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from sftflow.inference.tool_format import (check_tool_messages, hf_tool_messages, is_tool_conversation,
                                           native_tool_render_kwargs, supports_tools, tool_text_fallback)

IGNORE_INDEX = -100
TEMPLATES: tuple[str, ...] = ("gemma", "chatml", "native")

# (turn opener, turn closer, role names) per built-in template.
_GEMMA = {"open": "<start_of_turn>", "close": "<end_of_turn>", "roles": {"user": "user", "assistant": "model"}}
_CHATML = {
    "open": "<|im_start|>",
    "close": "<|im_end|>",
    "roles": {"system": "system", "user": "user", "assistant": "assistant"},
}
_BUILTIN = {"gemma": _GEMMA, "chatml": _CHATML}

# End-of-turn markers of common chat templates, for ``stop_token_ids`` on native templates.
_KNOWN_END_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


# --------------------------------------------------------------------------- template choice
def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer ships its own chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(tokenizer: Any, template: str | None) -> str:
    """Pick the template to use.

    Args:
        tokenizer: a transformers tokenizer.
        template: ``None`` (the tokenizer's own template when it has one, else ``gemma``),
            ``"gemma"``, ``"chatml"`` or ``"native"``.

    Returns:
        ``"native"``, ``"gemma"`` or ``"chatml"``.

    Raises:
        ValueError: unknown template, or ``native`` forced on a tokenizer without a chat template.
    """
    if template is None:
        return "native" if has_chat_template(tokenizer) else "gemma"
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {list(TEMPLATES)} or None")
    if template == "native" and not has_chat_template(tokenizer):
        raise ValueError("template 'native' requested but the tokenizer has no chat_template; use 'gemma' or 'chatml'")
    return template


# --------------------------------------------------------------------------- validation
def _check_messages(messages: Sequence[dict[str, str]], *, for_generation: bool) -> list[dict[str, str]]:
    """Normalise and validate a conversation; errors say which turn is wrong."""
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not msgs:
        raise ValueError("conversation is empty")
    for i, m in enumerate(msgs):
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role: must be system|user|assistant (got {m['role']!r})")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}].role: a system message may only come first")
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body or body[0]["role"] != "user":
        raise ValueError("conversation must start with a user turn (after an optional system turn)")
    for i in range(1, len(body)):
        if body[i]["role"] == body[i - 1]["role"]:
            raise ValueError(f"turns must alternate user/assistant; two {body[i]['role']!r} turns in a row")
    if for_generation and body[-1]["role"] != "user":
        raise ValueError("a generation prompt must end with a user turn (got a trailing assistant turn)")
    if not for_generation and not any(m["role"] == "assistant" for m in body):
        raise ValueError("a training conversation needs at least one assistant turn")
    return msgs


def _fold_system(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Gemma has no system role: prepend the system prompt to the first user turn."""
    if msgs and msgs[0]["role"] == "system":
        system, rest = msgs[0]["content"], [dict(m) for m in msgs[1:]]
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}" if system else rest[0]["content"]
        return rest
    return msgs


# --------------------------------------------------------------------------- built-in templates
def _ids(tokenizer: Any, text: str, *, data: bool) -> list[int]:
    """Token ids of one piece; user data never turns into special tokens."""
    if not text:
        return []
    kwargs = {"split_special_tokens": True} if data else {}
    return list(tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"])


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when it is one token of the vocabulary, else None."""
    tid = tokenizer.convert_tokens_to_ids(text)
    # Unknown tokens map to unk (or None); a round trip tells a real single token apart.
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != text:
        return None
    return int(tid)


def _marker_ids(tokenizer: Any, marker: str) -> list[int]:
    tid = _single_token(tokenizer, marker)
    return [tid] if tid is not None else _ids(tokenizer, marker, data=False)


def _wants_bos(tokenizer: Any, template: str) -> bool:
    """Gemma needs <bos> first; chatml adds it only where the tokenizer would anyway."""
    if tokenizer.bos_token_id is None:
        return False
    if template == "gemma":
        return True
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def _unlearned_assistants(messages: Sequence[dict[str, Any]]) -> frozenset[int]:
    """Ordinals (0 = first assistant turn) of the assistant turns with ``loss_weight`` 0, never learned.
    Counting assistant turns keeps them valid after gemma folds the system turn or the tool fallback
    regroups the others. ValueError: a weight not 0/1, 1 off an assistant turn, or 0 on every one."""
    skip, k = set(), 0
    for i, m in enumerate(messages):
        w, asst = m.get("loss_weight"), m.get("role") == "assistant"
        if w is not None and w == w:  # None / NaN (Parquet's null): no weight
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1) or (w == 1 and not asst):
                raise ValueError(f"messages[{i}].loss_weight: expected 0 or 1, got {w!r} on a {m.get('role')!r} "
                                 "turn (whole assistant turns are masked; only they are learned)")
            if w == 0 and asst:
                skip.add(k)
        k += asst
    if k and len(skip) == k:
        raise ValueError("every assistant turn has loss_weight 0: the conversation has nothing to learn")
    return frozenset(skip)


def _builtin_segments(tokenizer: Any, msgs: list[dict[str, str]], template: str, *, add_generation_prompt: bool,
                      unlearned: frozenset[int] = frozenset()):
    """Yield (ids, learned) pieces of a conversation in a built-in template (``unlearned``: assistant
    ordinals that are context only)."""
    spec = _BUILTIN[template]
    if template == "gemma":
        msgs = _fold_system(msgs)
    open_ids, close_ids = _marker_ids(tokenizer, spec["open"]), _marker_ids(tokenizer, spec["close"])
    newline = _ids(tokenizer, "\n", data=False)
    segments: list[tuple[list[int], bool]] = []
    if _wants_bos(tokenizer, template):
        segments.append(([tokenizer.bos_token_id], False))
    k = 0
    for m in msgs:
        learned = m["role"] == "assistant" and k not in unlearned
        k += m["role"] == "assistant"
        header = open_ids + _ids(tokenizer, spec["roles"][m["role"]] + "\n", data=False)
        segments.append((header, False))
        # The content and the end-of-turn marker are what the model must learn to produce.
        segments.append((_ids(tokenizer, m["content"], data=True) + close_ids, learned))
        segments.append((newline, False))
    if add_generation_prompt:
        segments.append((open_ids + _ids(tokenizer, spec["roles"]["assistant"] + "\n", data=False), False))
    return segments


# --------------------------------------------------------------------------- native templates
# Stands in for message i while rendering the template; no template alters such a plain word.
_PLACEHOLDER = "SFTFLOWMSG{}X7Q"


def _render(tokenizer: Any, msgs: list[dict[str, str]], *, add_generation_prompt: bool,
            render_kwargs: dict[str, Any] | None = None) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **(render_kwargs or {}))


def _native_pieces(tokenizer: Any, msgs: list[dict[str, str]], *, add_generation_prompt: bool,
                   render_kwargs: dict[str, Any] | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_message_text)`` pieces whose concatenation is the rendering.

    The template is rendered once with placeholders for the contents (giving the template's own
    text) and once for real; the real rendering must be the template text with each placeholder
    replaced by its message's content (or the content trimmed, as many templates ``| trim`` it).
    """
    real = _render(tokenizer, msgs, add_generation_prompt=add_generation_prompt, render_kwargs=render_kwargs)
    if render_kwargs is None:
        marks = [_PLACEHOLDER.format(i) for i in range(len(msgs))]
    else:
        # Tool mode: an empty content (a pure tool call) stays empty; templates test it (``if content``).
        marks = [_PLACEHOLDER.format(i) if m["content"] else "" for i, m in enumerate(msgs)]
    if any(mk and mk in m["content"] for m in msgs for mk in marks):  # paranoid: data that spells a placeholder
        raise ValueError("message text contains sftflow's internal placeholder string")
    skeleton = _render(tokenizer, [{**m, "content": mk or m["content"]} for m, mk in zip(msgs, marks)],
                       add_generation_prompt=add_generation_prompt, render_kwargs=render_kwargs)
    parts = re.split("(" + "|".join(re.escape(mk) for mk in marks if mk) + ")", skeleton)
    pieces: list[tuple[str, bool]] = []
    cur = 0
    for k, part in enumerate(parts):
        if k % 2 == 0:  # template text
            if not real.startswith(part, cur):
                break
            pieces.append((part, False))
            cur += len(part)
            continue
        content = msgs[marks.index(part)]["content"]
        following = parts[k + 1]
        for cand in dict.fromkeys((content, content.strip())):
            if real.startswith(cand, cur) and real.startswith(following, cur + len(cand)):
                pieces.append((cand, True))
                cur += len(cand)
                break
        else:
            break
    else:
        if cur == len(real):
            return [(t, c) for t, c in pieces if t]
    raise ValueError(
        "the tokenizer's chat template changes message text (beyond trimming it), so message text cannot be "
        "kept apart from template control tokens; set training.template to 'gemma' or 'chatml'"
    )


def _native_ids(tokenizer: Any, msgs: list[dict[str, str]], *, add_generation_prompt: bool,
                offsets: bool = False, render_kwargs: dict[str, Any] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of the rendered conversation: template text may hold control tokens, message text never does.

    Returns ids and (with ``offsets``) each token's char span in the rendering.
    """
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    base = 0
    for text, is_content in _native_pieces(tokenizer, msgs, add_generation_prompt=add_generation_prompt,
                                           render_kwargs=render_kwargs):
        kwargs: dict[str, Any] = {"split_special_tokens": True} if is_content else {}
        if offsets:
            kwargs["return_offsets_mapping"] = True
        enc = tokenizer(text, add_special_tokens=False, **kwargs)
        ids.extend(enc["input_ids"])
        if offsets:
            spans.extend((base + s, base + e) for s, e in enc["offset_mapping"])
        base += len(text)
    return ids, spans


def _native_learned_spans(tokenizer: Any, msgs: list[dict[str, str]],
                          render_kwargs: dict[str, Any] | None = None,
                          unlearned: frozenset[int] = frozenset()) -> tuple[str, list[tuple[int, int]]]:
    """Full rendering + char spans of each assistant turn (content + end-of-turn).

    Rendering ``msgs[:i]`` with the generation prompt gives where assistant turn ``i`` starts;
    rendering ``msgs[:i+1]`` gives where it ends. Both must be prefixes of the full rendering.
    """
    full = _render(tokenizer, msgs, add_generation_prompt=False, render_kwargs=render_kwargs)
    spans = []
    k = -1
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        k += 1
        if k in unlearned:  # loss_weight 0: context only
            continue
        start_text = _render(tokenizer, msgs[:i], add_generation_prompt=True, render_kwargs=render_kwargs)
        end_text = _render(tokenizer, msgs[: i + 1], add_generation_prompt=False, render_kwargs=render_kwargs)
        if not (full.startswith(start_text) and full.startswith(end_text) and len(end_text) > len(start_text)):
            raise ValueError(
                "the tokenizer's chat template does not render conversations prefix by prefix, so the "
                "assistant mask cannot be derived; set training.template to 'gemma' or 'chatml'"
            )
        # Trailing whitespace after the end-of-turn marker is template glue, not something to learn.
        spans.append((len(start_text), len(end_text.rstrip())))
    return full, spans


def _native_encode(tokenizer: Any, msgs: list[dict[str, str]], render_kwargs: dict[str, Any] | None = None,
                   unlearned: frozenset[int] = frozenset()) -> tuple[list[int], list[int]]:
    _, spans = _native_learned_spans(tokenizer, msgs, render_kwargs=render_kwargs, unlearned=unlearned)
    ids, offsets = _native_ids(tokenizer, msgs, add_generation_prompt=False, offsets=True, render_kwargs=render_kwargs)
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, end) in enumerate(offsets):
        if end > start and any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels


# --------------------------------------------------------------------------- public API
def encode_for_training(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    template: str,
    max_len: int | None = None,
    tools: Any = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation.

    Args:
        tokenizer: a transformers tokenizer (fast, for ``native``).
        messages: ``[{role, content}, ...]``: optional system, then alternating user/assistant;
            in a tool conversation also ``tool`` turns and assistant ``tool_calls``.
        template: a resolved template (``resolve_template``).
        max_len: truncate to this many tokens (from the right); ``None`` keeps everything.
        tools: the tool schemas (the record's ``tools``: JSON text or a list); None/"" for none.

    Returns:
        ``(input_ids, labels)`` of equal length; labels are ``-100`` except on assistant content
        and its end-of-turn marker (every assistant turn of a multi-turn conversation, but those
        carrying ``loss_weight`` 0).

    Raises:
        ValueError: malformed conversation or template.
    """
    template = resolve_template(tokenizer, template) if template not in ("gemma", "chatml") else template
    if is_tool_conversation(messages, tools):
        return _encode_tool_conversation(tokenizer, messages, template=template, tools=tools, max_len=max_len)
    msgs = _check_messages(messages, for_generation=False)
    unlearned = _unlearned_assistants(messages)
    if template == "native":
        ids, labels = _native_encode(tokenizer, msgs, unlearned=unlearned)
    else:
        ids, labels = [], []
        for seg, learned in _builtin_segments(tokenizer, msgs, template, add_generation_prompt=False,
                                              unlearned=unlearned):
            ids.extend(seg)
            labels.extend(seg if learned else [IGNORE_INDEX] * len(seg))
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def build_generation_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], *, template: str,
                            tools: Any = None) -> list[int]:
    """Prompt ids ending with the assistant-turn opener (the model continues with the answer).

    The ids equal the training encoding of the same conversation up to the assistant content.
    ``tools`` (schemas) and tool turns render as in ``encode_for_training``; such a prompt may
    also end with a ``tool`` turn (the model continues after the tool's result).

    Raises:
        ValueError: the conversation ends with an assistant turn or is malformed.
    """
    template = resolve_template(tokenizer, template) if template not in ("gemma", "chatml") else template
    if is_tool_conversation(messages, tools):
        return _tool_generation_prompt(tokenizer, messages, template=template, tools=tools)
    msgs = _check_messages(messages, for_generation=True)
    if template == "native":
        return _native_ids(tokenizer, msgs, add_generation_prompt=True)[0]
    out: list[int] = []
    for seg, _ in _builtin_segments(tokenizer, msgs, template, add_generation_prompt=True):
        out.extend(seg)
    return out


def stop_token_ids(tokenizer: Any, template: str) -> list[int]:
    """Ids that end an assistant turn: the template's end-of-turn marker, then eos (deduplicated)."""
    template = resolve_template(tokenizer, template) if template not in ("gemma", "chatml") else template
    ids: list[int] = []
    if template in _BUILTIN:
        tid = _single_token(tokenizer, _BUILTIN[template]["close"])
        if tid is not None:
            ids.append(tid)
    else:
        # The first token after an assistant message in the rendered template is its end marker.
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        full, spans = _native_learned_spans(tokenizer, msgs)
        tail = full[spans[-1][0]:spans[-1][1]]
        tail_ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
        if tail_ids and tail_ids[-1] in set(tokenizer.all_special_ids):
            ids.append(tail_ids[-1])
        for marker in _KNOWN_END_MARKERS:
            tid = _single_token(tokenizer, marker)
            if tid is not None and marker in full:
                ids.append(tid)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(int(i) for i in ids))


def end_of_turn_text(template: str) -> str | None:
    """The end-of-turn marker string of a built-in template (None for native)."""
    return _BUILTIN[template]["close"] if template in _BUILTIN else None


# --------------------------------------------------------------------------- tool conversations
def _encode_tool_conversation(tokenizer: Any, messages: Sequence[dict[str, Any]], *, template: str,
                              tools: Any, max_len: int | None) -> tuple[list[int], list[int]]:
    """``encode_for_training`` of a tool conversation: the template renders tools itself, or the text fallback."""
    msgs = [dict(m) for m in messages]
    check_tool_messages(msgs, for_generation=False)
    if template == "native" and supports_tools(tokenizer):
        kwargs = native_tool_render_kwargs(tokenizer, msgs, tools)
        hf = hf_tool_messages(msgs)
        ids, labels = _native_encode(tokenizer, hf, render_kwargs=kwargs, unlearned=_unlearned_assistants(msgs))
        if max_len is not None:
            ids, labels = ids[:max_len], labels[:max_len]
        return ids, labels
    return encode_for_training(tokenizer, tool_text_fallback(msgs, tools), template=template, max_len=max_len)


def _tool_generation_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]], *, template: str,
                            tools: Any) -> list[int]:
    """``build_generation_prompt`` of a tool conversation: the template renders tools itself, or the text fallback."""
    msgs = [dict(m) for m in messages]
    check_tool_messages(msgs, for_generation=True)
    if template == "native" and supports_tools(tokenizer):
        kwargs = native_tool_render_kwargs(tokenizer, msgs, tools)
        return _native_ids(tokenizer, hf_tool_messages(msgs), add_generation_prompt=True, render_kwargs=kwargs)[0]
    return build_generation_prompt(tokenizer, tool_text_fallback(msgs, tools), template=template)


def with_default_system(chat_template: str, system: str | None) -> str:
    """A Jinja chat template that renders a conversation without a system turn as if it began with
    ``system`` (issue 24: a served model gets plain messages, while it was trained and evaluated with
    the seed tag as its system turn). A conversation with its own system turn renders unchanged.

    Args:
        chat_template: a chat template that reads ``messages`` (e.g. the registry's serving template).
        system: the default system prompt; None or empty returns ``chat_template`` as it is.
    """
    if not system:
        return chat_template
    import json

    # A JSON string is a valid Jinja string literal (quotes and newlines escaped).
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{%- set messages = [{'role': 'system', 'content': " + json.dumps(system) + "}] + messages -%}"
            "{%- endif -%}" + chat_template)
