"""The row vocabulary every format converter shares, and the converters of the flat formats.

``sftflow.data.formats`` (the entry point: detection, loading, ``CONVERTERS``) reads rows with these;
the conversation format (``messages``: ShareGPT / LLaMA-Factory / OpenAI, tool calls) lives in
``sftflow.data.format_messages`` on the same vocabulary. What is here:

* ``RowError`` (one bad row, its message the quarantine reason) and ``ConvertOptions`` (a source's
  ``reasoning`` / ``preference`` settings);
* the field rules shared by converters: required/optional string fields, the ``chosen`` side of a
  preference (DPO) row, a KTO ``label``;
* one converter per flat format: ``convert_alpaca``, ``convert_dolly``, ``convert_human_assistant``,
  ``convert_self_instruct``, ``convert_gsm8k``. A converter returns one item per record the row
  yields: ``(messages, category[, meta])`` or a ``RowError`` (Self-Instruct: one per instance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sftflow.data.answers import extract_final_answer
from sftflow.data.readers import type_name

# GSM8K's calculator annotations: "48/2 = <<48/2=24>>24".
_CALC = re.compile(r"<<[^<>]*>>")
# The turn markers of the human_assistant format (``### Human: … ### Assistant: …``); detection uses it too.
HUMAN_ASSISTANT_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


class RowError(ValueError):
    """One row is bad; its message is the reason it is rejected (quarantined at ingestion)."""


@dataclass(frozen=True)
class ConvertOptions:
    """Per-source conversion options (``SourceConfig.reasoning`` / ``SourceConfig.preference``)."""

    reasoning: str = "keep"
    preference: str | None = None


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


def preference_response(o: dict, opts: ConvertOptions, *, where: str) -> Any:
    """The ``chosen`` side of a preference row when ``preference: chosen``; RowError otherwise."""
    if opts.preference != "chosen":
        raise RowError("preference pair (`chosen`/`rejected`) has no single response to train on: set "
                       f"`preference: chosen` on the source to train on the chosen response{where}")
    if "chosen" not in o or o["chosen"] is None:
        raise RowError("preference row without `chosen` (expected the preferred response)")
    return o["chosen"]


def check_kto_label(o: dict) -> None:
    """A KTO row (``label``) is a training target only when its label is true."""
    if "label" not in o:
        return
    label = o["label"]
    if not isinstance(label, bool):
        raise RowError(f"field 'label' must be true or false (a KTO desirability label), got {type_name(label)}")
    if not label:
        raise RowError("KTO row with label=false: the response is marked undesirable, so it is not a training "
                       "target (only label=true rows are kept)")


def convert_alpaca(o: dict, opts: ConvertOptions) -> list[Any]:
    """Alpaca ``{instruction, input?, output, system?}`` (or a preference/KTO row of that shape) -> one record."""
    check_kto_label(o)
    if "chosen" in o or "rejected" in o:
        instruction, inp = _req_str(o, "instruction"), _req_str(o, "input", optional=True)
        chosen = preference_response(o, opts, where="")
        if not isinstance(chosen, str):
            raise RowError(f"field 'chosen' must be a string, got {type_name(chosen)}")
        out = chosen
    else:
        instruction, inp, out = _req_str(o, "instruction"), _req_str(o, "input", optional=True), _req_str(o, "output")
    system = _req_str(o, "system", optional=True)
    msgs = ([{"role": "system", "content": system.strip()}] if system.strip() else [])
    msgs += [{"role": "user", "content": _user_content(instruction, inp)}, {"role": "assistant", "content": out.strip()}]
    return [(msgs, "")]


def convert_dolly(o: dict, opts: ConvertOptions) -> list[Any]:
    """Dolly ``{instruction, context?, response, category?}`` -> one record (the category carried)."""
    instruction, ctx, resp = _req_str(o, "instruction"), _req_str(o, "context", optional=True), _req_str(o, "response")
    cat = o.get("category") if isinstance(o.get("category"), str) else ""
    return [([{"role": "user", "content": _user_content(instruction, ctx)},
              {"role": "assistant", "content": resp.strip()}], cat)]


def convert_human_assistant(o: dict, opts: ConvertOptions) -> list[Any]:
    """``{text: "### Human: … ### Assistant: …"}`` -> one record with every marked turn."""
    text = _req_str(o, "text")
    parts = HUMAN_ASSISTANT_MARKER.split(text)
    if len(parts) < 3:
        raise RowError("no '### Human:' / '### Assistant:' markers in `text`")
    if parts[0].strip():
        raise RowError("text before the first '### Human:' marker")
    msgs = [{"role": "user" if who.lower() == "human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]
    return [(msgs, "")]


def convert_self_instruct(o: dict, opts: ConvertOptions) -> list[Any]:
    """Self-Instruct ``{instruction, instances: [{input, output}]}`` -> one record (or RowError) per instance."""
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


def convert_gsm8k(o: dict, opts: ConvertOptions) -> list[Any]:
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
