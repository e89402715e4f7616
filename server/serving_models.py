"""The served model: its names, its context length, and the check that a request names it."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from kvcat.models import LoadedModel
from kvcat.server.errors import ApiError
from kvcat.server.protocol import DetokenizeRequest, TokenizeRequest
from kvcat.server.responses import DetokenizeResponse, TokenizeResponse

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


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

    @functools.cached_property
    def sampling_defaults(self) -> dict:
        """Sampling settings of the model's generation_config.json (what vLLM's --generation-config auto reads)."""
        path = Path(self.lm.spec.path) / "generation_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: config[k] for k in SAMPLING_KEYS if isinstance(config.get(k), (int, float))}

    @property
    def max_positions(self) -> int:
        return int(self.lm.spec.max_positions)

    def check(self, model: str | None) -> None:
        """A request may name the model by its served id, zoo name or folder, or not at all."""
        if model is not None and model not in (self.name, str(self.lm.spec.path), self.lm.spec.name):
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r}",
                           "invalid_request_error", "model", "model_not_found")

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        from kvcat.server import prompting

        self.check(req.model)
        tok = self.tokenizer
        try:
            if req.messages is not None:
                text = prompting.render(tok, [m.for_template() for m in req.messages], req.add_generation_prompt)
                ids = prompting.encode(tok, text)  # the template writes its own special tokens
            else:
                ids = list(tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        except prompting.PromptError as exc:
            raise ApiError(422, str(exc), "invalid_request_error", "messages") from None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_positions, tokens=ids)

    def check_token_ids(self, ids, param: str) -> None:
        """422 naming `param` when a token id a request gives is outside the vocabulary."""
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(422, f"token ids {bad[:5]} are outside the vocabulary of {vocab}", "invalid_request_error",
                           param)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check(req.model)
        self.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

