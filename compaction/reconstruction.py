"""The "repeat" reference queries: context reconstruction, as KVzip does. Every chunk of the document is copied
after "Repeat the previous context verbatim." (in the chat's question slot), each copy running right after the
cached document (continuing from its K/V), so that its queries look back at every token as later questions do.
`Reconstruction` runs it one decoder layer at a time: one layer's queries in memory, the attention each key gets
recorded inside attention, on-policy queries for free."""

from __future__ import annotations

import time

import torch

from kvcat import prompts
from kvcat.attention import KeyScores, use_kvcat_attention
from kvcat.inference import as_ids
from kvcat.models import LoadedModel

from .document import DocumentState

REPEAT_INSTRUCTION = "Repeat the previous context verbatim."
# The "repeat" reference queries reconstruct the whole document, REPEAT_CHUNK tokens per copy prompt.
REPEAT_CHUNK = 512


def reconstruction_inputs(lm: LoadedModel, ids: list[int], room: int, chunk: int = REPEAT_CHUNK) -> list[list[int]]:
    """Context reconstruction prompts that together copy every token of the document (as KVzip does): the
    repeat instruction in the question slot, then one chunk of the document. Each runs right after the
    context (positions N..), so `room` (positions left after it) bounds instruction + chunk; [] when not
    even the instruction and two tokens fit."""
    head = prompts.question_ids(lm.tokenizer, REPEAT_INSTRUCTION)
    size = min(chunk, room - len(head))
    if size < 2:
        return []
    return [head + ids[a:a + size] for a in range(0, len(ids), size)]


class _LayerPast:
    """The minimal cache interface an attention module calls (`update`) for one layer's pass: attention sees
    the given K/V [H, T, d] followed by the new tokens', and nothing is stored."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys[None], values[None]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2), \
            torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2)


class Reconstruction:
    """The "repeat" reference queries, computed one layer at a time: every chunk of the document is copied
    after the repeat instruction (`reconstruction_inputs`), over the document's K/V.

    Running the decoder layer by layer keeps one layer's queries at a time (about 9.7 MB for a 4k-token
    SmolLM2 document instead of 290 MB for all layers) plus the prompts' hidden states, and makes on-policy
    queries free: after a layer is compacted, `advance(compacted)` runs that layer's attention over its
    compacted cache, so the next layer's queries come from a model whose earlier layers are compacted.

        rec = Reconstruction(lm, state)
        for layer in range(L):
            q = rec.queries(layer)       # [num_heads, n, head_dim], post-RoPE
            ...                          # solve the layer
            rec.advance()                # or rec.advance((C_k, C_v, beta)) for on-policy queries
    """

    def __init__(self, lm: LoadedModel, state: DocumentState, chunk: int = REPEAT_CHUNK):
        use_kvcat_attention(lm.model)
        self.lm, self.state, self.layer, self.seconds = lm, state, 0, 0.0
        start = time.perf_counter()
        n0 = state.num_tokens
        inputs = reconstruction_inputs(lm, state.ids.tolist(), lm.spec.max_positions - n0, chunk)
        decoder = lm.model.model
        with torch.no_grad():
            self.hidden = [decoder.embed_tokens(as_ids(x, lm.device)) for x in inputs]
            self.positions = [torch.arange(n0, n0 + len(x), device=lm.device)[None] for x in inputs]
            self.rope = [decoder.rotary_emb(h, position_ids=p) for h, p in zip(self.hidden, self.positions)]
        self._out: list[torch.Tensor] | None = None
        self.key_scores: KeyScores | None = None
        self.seconds += time.perf_counter() - start

    @property
    def empty(self) -> bool:
        """No room after the document for a copy prompt (the caller falls back to the context's queries)."""
        return not self.hidden

    @torch.no_grad()
    def _run(self, layer: int, keys, values, bias=None, capture: dict | None = None,
             scores: KeyScores | None = None) -> list[torch.Tensor]:
        block = self.lm.model.model.layers[layer]
        past = _LayerPast(keys.to(self.lm.model.dtype), values.to(self.lm.model.dtype))
        out = []
        for h, pos, rope in zip(self.hidden, self.positions, self.rope):
            out.append(block(h, position_ids=pos, past_key_values=past, use_cache=True, position_embeddings=rope,
                             kvcat_queries=capture, kvcat_bias={layer: bias} if bias is not None else None,
                             kvcat_key_scores={layer: scores} if scores is not None else None))
        return out

    def queries(self, layer: int) -> torch.Tensor:
        """Post-RoPE queries of every copy prompt at `layer` [num_heads, n, head_dim]. The attention they pay
        each document key is recorded on the way (`key_scores`): every copy query scores the keys, however
        few of them a solver later fits on."""
        if layer != self.layer:
            raise RuntimeError(f"reconstruction is at layer {self.layer}; asked for layer {layer}")
        start = time.perf_counter()
        got: dict[int, list[torch.Tensor]] = {}
        pre = self.state.prefill
        self.key_scores = KeyScores(self.lm.spec.num_heads, self.state.num_tokens, self.lm.device)
        self._out = self._run(layer, pre.keys[layer], pre.values[layer], capture=got, scores=self.key_scores)
        q = torch.cat(got[layer], dim=1)
        self.seconds += time.perf_counter() - start
        return q

    def advance(self, compacted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Move to the next layer: the prompts' hidden states after this layer over the full cache, or over
        `compacted` = (keys [H, t, d], values [H, t, d], beta [H, t]) for on-policy queries."""
        if self._out is None:
            raise RuntimeError("advance() before queries() of this layer")
        start = time.perf_counter()
        if compacted is None:
            self.hidden = self._out
        else:
            keys, values, beta = compacted
            self.hidden = self._run(self.layer, keys, values, bias=beta.to(self.lm.model.dtype))
        self._out = None
        self.layer += 1
        self.seconds += time.perf_counter() - start


def repeat_queries(lm: LoadedModel, state: DocumentState) -> list[torch.Tensor]:
    """All layers' reconstruction queries at once (optimize, incremental joins; AM methods stream them
    through `LayerQueries` instead), their key scores memoized beside them. No room after the context: the
    context's own queries."""
    rec = Reconstruction(lm, state)
    if rec.empty:
        return list(state.prefill.queries)
    out = []
    for layer in range(lm.spec.num_layers):
        out.append(rec.queries(layer))
        state.scores[("reconstruction", layer)] = rec.key_scores
        rec.advance()
    return out


