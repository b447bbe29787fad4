"""Rebuild the GSM8K and tool-calling samples in data/instruct from ../shared/data (deterministic).

Run from the repo root:  python data/build_techniques_sample.py [--shared ../shared/data]

* ``instruct/gsm8k_alpaca_200.json``: the first 200 records of ``instruct/gsm8k_train_7473.json``,
  unchanged (Alpaca-shaped GSM8K: ``{instruction, input, output}``; the worked answers have no
  ``#### <answer>`` line, so ``format: gsm8k`` takes the last number as the final answer).
* ``instruct/toolformer_sharegpt_40.json``: 40 GPTeacher-Toolformer rows rewritten into the
  LLaMA-Factory ShareGPT tool-calling layout (``conversations`` with ``human`` / ``function_call``
  / ``observation`` / ``gpt`` turns, ``tools`` as a JSON string). No LLaMA-Factory tool-calling file
  is available offline, so this is a conversion, not an upstream file:
    - ``tools``: parsed from the row's own instruction (each tool's description line and its
      ``name(param)`` signature → ``{name, description, parameters: {param: string}}``);
    - ``human``: the task line of the instruction, a blank line, the row's ``input``;
    - ``function_call``: the single inline call of the row's ``output`` (``wikipedia('Mars')`` →
      ``{"name": "wikipedia", "arguments": {"query": "Mars"}}``);
    - 24 ``wikipedia`` rows whose query is the title of an article in
      ``unlabeled/wikipedia_leads_10033.json`` go on with an ``observation`` (that article's real
      lead section) and a ``gpt`` answer: the row's output with the inline call replaced by the
      first sentence of the observation (Toolformer's convention: a call stands for its result);
    - 16 rows of other tools (no result available offline) end with the call: the call is the
      training target.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
_CALL = re.compile(r"(\w+)\('([^']*)'\)")
_SIG = re.compile(r"^(\w+)\((\w+)\)$")


def _tools(instruction: str) -> tuple[list[dict], str] | None:
    """(tool schemas, task line) of a Toolformer instruction, or None when it does not parse."""
    lines = [x.strip() for x in instruction.split("\n") if x.strip()]
    if len(lines) < 5 or not lines[0].startswith("toolformer: enabled") or not lines[1].startswith("toolformer access:"):
        return None
    body, task = lines[2:-1], lines[-1]
    tools, desc = [], []
    for line in body:
        m = _SIG.match(line)
        if m:
            tools.append({"name": m.group(1), "description": " ".join(desc),
                          "parameters": {"type": "object", "properties": {m.group(2): {"type": "string"}},
                                         "required": [m.group(2)]}})
            desc = []
        else:
            desc.append(line)
    return (tools, task) if tools and not desc else None


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.strip())
    return m.group(1) if m else text.strip()


def build(shared: Path) -> None:
    """Write both samples from ``shared``."""
    gsm = json.loads((shared / "instruct/gsm8k_train_7473.json").read_text())
    (HERE / "instruct/gsm8k_alpaca_200.json").write_text(json.dumps(gsm[:200], ensure_ascii=False, indent=1) + "\n")

    rows = json.loads((shared / "instruct/gpteacher_toolformer_7673.json").read_text())
    leads = json.loads((shared / "unlabeled/wikipedia_leads_10033.json").read_text())
    with_result, call_only = [], []
    for r in rows:
        parsed = _tools(r["instruction"])
        calls = _CALL.findall(r["output"])
        if parsed is None or len(calls) != 1 or not r["input"].strip():
            continue
        tools, task = parsed
        (name, arg), = calls
        schema = next((t for t in tools if t["name"] == name), None)
        if schema is None:
            continue
        param = schema["parameters"]["required"][0]
        conv = [{"from": "human", "value": f"{task}\n\n{r['input'].strip()}"},
                {"from": "function_call", "value": json.dumps({"name": name, "arguments": {param: arg}})}]
        if name == "wikipedia" and arg in leads and len(with_result) < 24:
            extract = leads[arg]["extract"].strip()
            answer = r["output"].replace(f"{name}('{arg}')", _first_sentence(extract)).strip()
            conv += [{"from": "observation", "value": extract}, {"from": "gpt", "value": answer}]
            with_result.append({"conversations": conv, "tools": json.dumps(tools)})
        elif name != "wikipedia" and len(call_only) < 16:
            call_only.append({"conversations": conv, "tools": json.dumps(tools)})
        if len(with_result) == 24 and len(call_only) == 16:
            break
    out = with_result + call_only
    (HERE / "instruct/toolformer_sharegpt_40.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    build(ap.parse_args().shared)
