"""System-turn tags: the Humpback paper's way of telling seed data from augmented data.

Training rows carry a tag as their system turn (``augmentation.seed_system_prompt`` on the seed,
``augmented_system_prompt`` on curated pairs); at inference the paper prompts with the seed tag
("Answer in the style of an AI Assistant."). Evaluation must build its prompts exactly as training
built the rows it learned from, so the held-out set is tagged with the same function
(``tag_dataset``): one definition, used by the backtranslation stage for the seed, the curated
pairs' mixes and the held-out set.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from sftflow.data.records import frame_to_records, make_record, records_to_frame
from sftflow.data.refs import DatasetRef, write_parquet


def tag_records(records: Iterable[dict[str, Any]], system_prompt: str | None, *, origin: str | None = None
                ) -> list[dict[str, Any]]:
    """Records with ``system_prompt`` as their system turn (ids recomputed).

    An existing system prompt is kept after the tag (``"<tag>\\n\\n<existing>"``), so the tag is
    always the start of the system turn; a row already tagged is left as it is. ``None`` leaves
    the messages unchanged.

    Args:
        records: canonical records.
        system_prompt: the tag, or None.
        origin: the ``origin`` the output rows get (None: keep each row's own, default ``seed``).
    """
    out = []
    for r in records:
        msgs = [dict(m) for m in r["messages"]]
        if system_prompt:
            if msgs and msgs[0]["role"] == "system":
                if not msgs[0]["content"].startswith(system_prompt):
                    existing = msgs[0]["content"].strip()
                    msgs[0]["content"] = f"{system_prompt}\n\n{existing}" if existing else system_prompt
            else:
                msgs.insert(0, {"role": "system", "content": system_prompt})
        out.append(make_record(msgs, source=r["source"], origin=origin or r.get("origin") or "seed",
                               category=r.get("category", "") or "", score=r.get("score", math.nan)))
    return out


def tag_dataset(ref: DatasetRef, system_prompt: str | None, out_path: Path, *, name: str,
                origin: str | None = None) -> DatasetRef:
    """Write ``ref``'s rows with ``system_prompt`` as their system turn (``tag_records``).

    Args:
        ref: the dataset to tag.
        system_prompt: the tag; None copies the rows as they are (ids recomputed the same way).
        out_path: the Parquet file to write.
        name: the dataset name recorded in the ref (MLflow lineage).
        origin: as in ``tag_records``.

    Returns:
        The tagged dataset.
    """
    records = tag_records(frame_to_records(ref.read()), system_prompt, origin=origin)
    return write_parquet(records_to_frame(records), out_path, name=name)
