"""The policy app's OpenAI ingress: `ray.serve.llm`'s `OpenAiIngress` whose `/v1/models` also lists the adapters
of the local registry, each with the version a request is served with and the one a replica holds now.

`ray.serve.llm` lists adapters only from cloud storage (`dynamic_lora_loading_path`); the registry here is a
local or PVC directory (`services.adapters`), read on every call so a newly published version shows at once.
"""

from __future__ import annotations

from typing import Any

from ray.serve.llm.ingress import OpenAiIngress

from . import adapters, registry
from .private_apis import ModelCard, ModelList


class PolicyIngress(OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, adapter_root: str | None = None, **kwargs: Any):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._adapter_root = adapter_root

    async def _adapter_cards(self, base_model_id: str) -> dict[str, ModelCard]:
        if not self._adapter_root:
            return {}
        base = self._model_cards[base_model_id]
        server = self._default_serve_handles[base_model_id]
        try:
            state = await server.adapter_state.remote()
        except Exception:  # a replica still starting: the registry alone still answers
            state = {"loaded": {}, "failed": {}}
        loaded, failed = state["loaded"], state["failed"]
        cards = {}
        chosen = registry.promoted(self._adapter_root) or {}
        for name, version in adapters.list_current(self._adapter_root).items():
            model_id = f"{base_model_id}:{name}"
            cards[model_id] = ModelCard(
                id=model_id, object="model", owned_by=base.owned_by, permission=list(base.permission),
                metadata={**base.metadata, "adapter": name, "base_model": base_model_id, "current_version": version,
                          "loaded_version": _version_of(loaded.get(model_id)),
                          "promoted_version": chosen.get("version") if chosen.get("name") == name else None,
                          # versions a replica could not load (it keeps serving loaded_version): the reason
                          "load_errors": {str(_version_of(v)): why for v, why in failed.items()
                                          if v.rsplit("@v", 1)[0] == model_id}},
            )
        return cards

    async def models(self) -> ModelList:
        listed = await super().models()
        extra = {}
        for base_model_id in self._model_cards:
            extra.update(await self._adapter_cards(base_model_id))
        return ModelList(data=list(listed.data) + [c for k, c in extra.items() if k not in {m.id for m in listed.data}])

    async def model(self, model_id: str) -> ModelCard | None:
        card = await super().model(model_id)
        if card is None and ":" in model_id:
            card = (await self._adapter_cards(model_id.split(":", 1)[0])).get(model_id)
        return card


def _version_of(versioned: str | None) -> int | None:
    """`policy:st-s@v3` -> 3."""
    if not versioned or "@v" not in versioned:
        return None
    return int(versioned.rsplit("@v", 1)[1])
