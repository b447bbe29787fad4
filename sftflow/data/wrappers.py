"""Prompt-format wrappers: the same instruction written the ways users actually write it.

A model fine-tuned on one prompt shape can lose much of its quality when a user writes
"Q: … A:" or "### Human: … ### Assistant:" instead. Two places use the same list, defined once here:

* training (``training.format_diversification``): a configurable share of the training rows gets
  its user turns rewritten by a wrapper, chosen deterministically from the seed and the row id
  (``choose_wrapper``), so a re-run trains on exactly the same text;
* evaluation (``evaluation.format_robustness``): the held-out prompts are answered under the first
  N wrappers of ``WRAPPER_NAMES`` and the spread of ROUGE-L across them is reported.

A wrapper rewrites only the text of the **user** turns (and may add a system line); the result is
still rendered by the model's chat template (``sftflow.inference.formatting``), so the
conversation keeps its turn markers and inference stays consistent with training. Assistant turns,
tool turns and tool calls are never changed, so the training labels stay on the answer only.

Example::

    wrap_messages([{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}], "qa")
    # [{"role": "user", "content": "Q: Name a prime.\\nA:"}, {"role": "assistant", "content": "7"}]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Wrapper:
    """One prompt format.

    Attributes:
        name: the key used in config and metric names.
        user: the user turn's text, ``{text}`` standing for the original text.
        system: a system line added before the conversation when it has no system turn (None: none).
    """

    name: str
    user: str = "{text}"
    system: str | None = None

    def wrap_text(self, text: str) -> str:
        """The user text in this format (``str.replace``, so braces in the text are safe)."""
        return self.user.replace("{text}", text)


# Order matters: ``evaluation.format_robustness.wrappers: N`` evaluates the first N. "plain" (the
# text as it is: the format every evaluation already uses) comes first, so N=1 is the ordinary run.
WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper("plain"),
    Wrapper("instruction_response", "Instruction:\n{text}\n\nResponse:"),
    Wrapper("qa", "Q: {text}\nA:"),
    Wrapper("human_assistant", "### Human: {text}\n### Assistant:"),
    Wrapper("system_line", "{text}", system="You are a helpful assistant. Answer the user's request."),
    Wrapper("alpaca", "Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\n{text}\n\n### Response:"),
    Wrapper("task_colon", "Task: {text}"),
)
WRAPPER_NAMES: tuple[str, ...] = tuple(w.name for w in WRAPPERS)
_BY_NAME = {w.name: w for w in WRAPPERS}


def get_wrapper(name: str) -> Wrapper:
    """The wrapper called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown prompt wrapper {name!r}; known: {', '.join(WRAPPER_NAMES)}") from None


def wrap_messages(messages: Sequence[dict[str, Any]], wrapper: str | Wrapper) -> list[dict[str, Any]]:
    """A copy of ``messages`` with every user turn's text in ``wrapper``'s format.

    Assistant, tool and system turns are copied unchanged (the answer and its labels stay exactly
    as they were); a wrapper with a system line adds one only when the conversation has no system
    turn (an existing system prompt is the row's own instruction and wins).
    """
    w = get_wrapper(wrapper) if isinstance(wrapper, str) else wrapper
    out = [dict(m, content=w.wrap_text(str(m["content"]))) if m.get("role") == "user" else dict(m)
           for m in messages]
    if w.system and not (out and out[0].get("role") == "system"):
        out.insert(0, {"role": "system", "content": w.system})
    return out


def _unit(*parts: Any) -> float:
    """A uniform number in [0, 1) from ``parts`` (sha256: stable across processes and Python versions)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_wrapper(row_id: str, *, seed: int, share: float, names: Sequence[str]) -> str | None:
    """The wrapper a training row gets, or None to keep it as it is.

    Deterministic in ``(seed, row_id)``: the same row gets the same wrapper in every run and on
    every rank, whatever the row order; about ``share`` of the rows are wrapped, spread evenly
    over ``names``.
    """
    if share <= 0 or not names or _unit("diversify", seed, row_id) >= share:
        return None
    return names[int(_unit("wrapper", seed, row_id) * len(names))]
