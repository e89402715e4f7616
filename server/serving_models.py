"""The served model: its names, its context length, and the check that a request names it."""

from __future__ import annotations

from dataclasses import dataclass

from kvcat.models import LoadedModel
from kvcat.server.errors import ApiError


@dataclass
class ServedModel:
    name: str  # the id /v1/models reports
    lm: LoadedModel  # the transformers copy compaction runs on (same weights as the engine's)

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def fingerprint(self) -> str:
        return self.lm.spec.fingerprint

    @property
    def max_positions(self) -> int:
        return int(self.lm.spec.max_positions)

    def check(self, model: str | None) -> None:
        """A request may name the model by its served id, zoo name or folder, or not at all."""
        if model is not None and model not in (self.name, str(self.lm.spec.path), self.lm.spec.name):
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r}",
                           "invalid_request_error", "model", "model_not_found")
