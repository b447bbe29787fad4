"""The MLflow pyfunc class of model versions registered before the transformers chat flavor.

New versions are MLflow's ``transformers`` flavor (``registry.log_model``), which loads and serves
without this repository. This class stays so that versions logged earlier, which MLflow pickled
*by reference* to this module, still load (wherever ``sftflow`` is installed); it imports nothing
heavy at module level (no Prefect, no torch).
"""

from __future__ import annotations

import warnings

import mlflow.pyfunc

from sftflow.data.refs import ModelRef

with warnings.catch_warnings():
    # MLflow suggests type hints on ``predict`` (for its own input validation); the chat input here
    # is a DataFrame *or* a list of prompts, which its hint-based validation cannot express.
    warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")

    class SFTChatModel(mlflow.pyfunc.PythonModel):
        """Chat generation with the fine-tuned model, loadable offline (the weights are artifacts).

        Input: a DataFrame with a ``prompt`` column (one user turn each). Output: one response per row.
        Params: ``max_new_tokens`` (default 64), ``temperature`` (default 0 = greedy).
        """

        def load_context(self, context):  # MLflow hook
            from sftflow.inference.models import load_model

            cfg = context.model_config or {}
            kind = "adapter" if cfg.get("kind") == "adapter" else "merged"
            ref = ModelRef(path=context.artifacts["model"], sha256="", kind=kind, base=cfg.get("base_path", ""))
            self.ref = ref
            self.model, self.tokenizer = load_model(ref)
            self.template = cfg.get("template") or None
            # The default system turn the version was evaluated best with (issue 24: the seed tag, or none).
            self.system = cfg.get("system_prompt") or None

        def predict(self, context, model_input, params=None):  # MLflow hook
            from sftflow.inference.formatting import build_generation_prompt, resolve_template, stop_token_ids
            from sftflow.inference.batch import ModelHandle, generate_texts

            params = params or {}
            prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
            template = resolve_template(self.tokenizer, self.template)
            head = [{"role": "system", "content": self.system}] if getattr(self, "system", None) else []
            ids = [build_generation_prompt(self.tokenizer, [*head, {"role": "user", "content": str(p)}], template=template)
                   for p in prompts]
            # The one batch inference API, on the model loaded here (transformers: a server process has no engine).
            handle = ModelHandle(self.ref, loaded=(self.model, self.tokenizer))
            outs = generate_texts(handle, ids, max_new_tokens=int(params.get("max_new_tokens", 64)),
                                  temperature=float(params.get("temperature", 0.0)), batch_size=8,
                                  stop_ids=stop_token_ids(self.tokenizer, template), seed=0, backend="hf")
            return [o.text for o in outs]
