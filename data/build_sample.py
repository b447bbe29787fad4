"""Rebuild the demo and smoke samples in this folder from ../shared/data (the real sources).

Run from the repo root:  python data/build_sample.py [--shared ../shared/data]

Every row comes from the shared real data; the smoke set's deliberately bad rows are real rows
with one defect injected (listed in data/README.md), so the tests exercise the quarantine paths.
The output is deterministic (no randomness), so re-running gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _dump_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _key(instruction: str) -> str:
    return " ".join(instruction.lower().split())


def build(shared: Path) -> None:
    """Write data/instruct, data/unlabeled, data/smoke and data/licenses from ``shared``."""
    inst = shared / "instruct"
    # Dolly open_qa: the first 600 lines, byte for byte.
    lines = (inst / "dolly_open_qa_3742.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    out = HERE / "instruct" / "dolly_open_qa_600.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines[:600]), encoding="utf-8")

    # Alpaca GPT-4 vs Alpaca long (davinci-003): take every instruction the two files share,
    # so the demo keeps the real near-duplicate case (same instruction, different answers).
    gpt4 = json.loads((inst / "alpaca_gpt4_999.json").read_text(encoding="utf-8"))
    long_ = json.loads((inst / "alpaca_long_2000.json").read_text(encoding="utf-8"))
    shared_keys = {_key(r["instruction"]) for r in gpt4} & {_key(r["instruction"]) for r in long_}
    gpt4_pick = [r for r in gpt4 if _key(r["instruction"]) in shared_keys]
    gpt4_pick += [r for r in gpt4 if _key(r["instruction"]) not in shared_keys][: 300 - len(gpt4_pick)]
    long_pick = [r for r in long_ if _key(r["instruction"]) in shared_keys]
    long_pick += [r for r in long_ if _key(r["instruction"]) not in shared_keys][: 300 - len(long_pick)]
    _dump_json(gpt4_pick[:300], HERE / "instruct" / "alpaca_gpt4_300.json")
    _dump_json(long_pick[:300], HERE / "instruct" / "alpaca_long_300.json")

    # Wikipedia leads: first 400 entries, same title -> {title, extract, description, topic} layout.
    wiki = json.loads((shared / "unlabeled" / "wikipedia_leads_10033.json").read_text(encoding="utf-8"))
    items = list(wiki.items())
    _dump_json(dict(items[:400]), HERE / "unlabeled" / "wikipedia_leads_400.json")

    # ---------------------------------------------------------------- smoke set (tests, seconds)
    smoke = HERE / "smoke"
    smoke.mkdir(parents=True, exist_ok=True)
    dolly = [json.loads(x) for x in lines[600:640]]  # 40 real rows not in the demo sample
    dolly_lines = [json.dumps(r, ensure_ascii=False) for r in dolly]
    dolly_lines.append(json.dumps(dolly[0], ensure_ascii=False))  # exact duplicate of row 1
    near = dict(dolly[1])
    near["text"] = near["text"].rstrip(".") + "!"  # near duplicate of row 2 (punctuation only)
    dolly_lines.append(json.dumps(near, ensure_ascii=False))
    dolly_lines.append(dolly_lines[2][:-7])  # bad: truncated JSON line
    bad = dict(dolly[3])
    bad["text"] = bad["text"].split(" ### Assistant: ")[0] + " ### Assistant:   "  # bad: empty answer
    dolly_lines.append(json.dumps(bad, ensure_ascii=False))
    (smoke / "dolly_smoke.jsonl").write_text("\n".join(dolly_lines) + "\n", encoding="utf-8")

    alp = [dict(r) for r in long_[1000:1020]] + [dict(r) for r in gpt4[600:620]]
    alp.append(dict(alp[0]))  # exact duplicate
    near = dict(alp[21])
    near["instruction"] = near["instruction"].upper()  # duplicate after case normalization
    alp.append(near)
    alp.append({"instruction": "   ", "input": "", "output": alp[5]["output"]})  # bad: blank instruction
    alp.append({"instruction": alp[6]["instruction"], "input": ""})  # bad: missing output
    alp.append({"instruction": alp[7]["instruction"], "input": "", "output": 42})  # bad: wrong type
    _dump_json(alp, smoke / "alpaca_smoke.json")

    _dump_json(dict(items[400:420]), smoke / "wikipedia_leads_20.json")

    lic = HERE / "licenses"
    lic.mkdir(parents=True, exist_ok=True)
    for f in sorted((shared / "licenses").iterdir()):
        shutil.copyfile(f, lic / f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared" / "data"))
    build(Path(ap.parse_args().shared).resolve())


if __name__ == "__main__":
    main()
