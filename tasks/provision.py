"""Stage: provision the base model (embedded GGUF -> safetensors, tiny test model, local dir or hub id).

A thin Prefect task over ``sftflow.inference.models.resolve_model``. It is not cached by Prefect: the pull
is idempotent (a completed ``$SFTFLOW_HOME/models/<name>/`` is reused after a manifest check that
takes milliseconds), and re-resolving each run notices a deleted or changed model directory.
Retries cover I/O failures (hub, network); a missing package, an unknown name, a full disk or a
permission error fails the same way on every try, so ``retry_unless()`` does not retry them.

Run it alone::

    python -c 'from tasks.provision import provision; print(provision(name="gemma-3-270m"))'
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from sftflow.inference.models import resolve_model
from sftflow.ops.orchestration import IO_RETRIES, retry_unless, markdown_artifact
from sftflow.data.refs import ModelRef


def provision(*, name: str, trust_remote_code: bool = False) -> ModelRef:
    """Resolve ``name`` to a local model directory (pulling/converting/building it once).

    Args:
        name: embedded name (``gemma-3-270m``), tiny test model (``tiny-gemma``), local path or hub id.
        trust_remote_code: allow models whose config needs custom code.

    Returns:
        The model's ``ModelRef``.
    """
    return resolve_model(name, trust_remote_code=trust_remote_code)


@task(name="provision", cache_policy=NO_CACHE, **IO_RETRIES, retry_condition_fn=retry_unless())
def provision_task(name: str, *, trust_remote_code: bool) -> ModelRef:
    """Prefect task: ``provision`` plus a markdown artifact naming the model and its digest."""
    ref = provision(name=name, trust_remote_code=trust_remote_code)
    meta = ref.meta_dict()
    markdown_artifact(
        "provision",
        f"**model** `{name}` -> `{ref.path}`\n\n- kind: {ref.kind}\n- sha256: `{ref.sha256}`\n"
        + "".join(f"- {k}: {v}\n" for k, v in sorted(meta.items())),
        description=f"model {name}",
    )
    return ref
