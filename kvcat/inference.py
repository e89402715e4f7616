"""Reference inference in transformers: prefill a context, and run new tokens over a CompactCache.

This is the ground truth the server is checked against and the engine behind evaluation. New tokens sit at
their original positions (N, N+1, ...) after a compacted block of t slots, and beta is added to the logits
of those slots through `kvcat.attention`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvcat.attention import QueryBuffer, use_kvcat_attention
from kvcat.cache import CompactCache
from kvcat.heap import release_free_memory
from kvcat.models import LoadedModel


class ContextTooLongError(ValueError):
    """A document (plus what follows it) does not fit the model's context window."""

    def __init__(self, num_tokens: int, limit: int, what: str = "document"):
        self.num_tokens, self.limit = num_tokens, limit
        super().__init__(f"the {what} has {num_tokens} tokens but the model's context holds {limit}")


@dataclass
class Prefill:
    """Post-RoPE keys and values of a context (and optionally its queries), per layer."""

    keys: list[torch.Tensor]  # [num_kv_heads, N, head_dim]
    values: list[torch.Tensor]  # [num_kv_heads, N, head_dim]
    queries: list[torch.Tensor] | None  # [num_heads, N, head_dim]
    last_logits: torch.Tensor  # [vocab]: the distribution after the last context token
    token_nll: torch.Tensor | None = None  # [N] surprisal -log p(x_i | x_<i) of each token (0 for the first)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[1]


def as_ids(tokens, device) -> torch.Tensor:
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
    return ids[None] if ids.dim() == 1 else ids


NLL_SLICE = 32  # positions whose vocabulary logits are held at once (SmolLM2: 32 x 49,152 fp32 = 6.3 MB)


def _chunk_nll(lm: LoadedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target_i | hidden_i) for each row, NLL_SLICE rows of logits at a time. A whole 512-token chunk's
    logits at once raised a 4k-token SmolLM2 prefill's peak to 2.9x its K/V (1.3x without them); slices of 64
    rows 2.0x, 32 rows 1.7x at the same speed, 16 rows 1.2x but 7% slower (benchmarks/NOTES.md)."""
    head = lm.model.get_output_embeddings()
    if len(targets) == 0:  # a last chunk of one token: nothing after it to predict
        return hidden.new_zeros(0)
    return torch.cat([torch.nn.functional.cross_entropy(head(hidden[i:i + NLL_SLICE]).float(),
                                                        targets[i:i + NLL_SLICE], reduction="none")
                      for i in range(0, len(targets), NLL_SLICE)])


@torch.no_grad()
def prefill(lm: LoadedModel, tokens, capture_queries: bool = False, chunk_size: int = 512,
            past: Prefill | None = None, query_positions: torch.Tensor | None = None,
            keep_new_kv: bool = True, token_nll: bool = False) -> Prefill:
    """Run the context through the model in chunks, keeping K/V (and queries) of every layer.

    Small chunks bound the activations held at once, which dominate the peak: a 4,096-token SmolLM2-135M
    prefill (2 CPU cores, fp32, peak RSS above the warm model, exact high-water mark) peaks at 403-472 MB in
    one chunk (19-19.5 s), 305 MB in 2,048-token chunks, 223-240 MB in 512-token chunks (21-21.7 s), and 211
    MB once the K/V buffers are allocated at their final size (`_filled_layer`); the K/V alone are 180 MB.

    With `past`, continue after an existing Prefill instead of starting from an empty cache (its tokens are
    not run again): the result holds the K/V of past + tokens, and queries of `tokens` only.
    With `query_positions` (sorted indices into `tokens`), only those queries are kept (less memory).
    With `keep_new_kv=False` (a queries-only pass after `past`, e.g. reference queries), the new tokens'
    K/V are used by attention but not stored: the result holds the K/V of `past` only, and the pass never
    holds a second copy of the whole cache.
    With `token_nll`, each token's surprisal under the model is kept (the output layer runs on every
    position, NLL_SLICE of them at a time: about a fifth more work for SmolLM2)."""
    from transformers import DynamicCache

    ids = as_ids(tokens, lm.device)
    offset = past.num_tokens if past is not None else 0
    n = ids.shape[1]
    if n == 0:
        raise ValueError("cannot prefill an empty context")
    if offset + n > lm.spec.max_positions:
        raise ContextTooLongError(offset + n, lm.spec.max_positions)
    use_kvcat_attention(lm.model)
    cache = DynamicCache(config=lm.model.config)
    if not keep_new_kv:
        if past is None:
            raise ValueError("keep_new_kv=False needs a past to continue from")
        chunk_size = n  # one pass: a later chunk would need the K/V this pass does not keep
        cache.layers = [_peek_layer()(k, v) for k, v in zip(past.keys, past.values)]
    else:
        cache.layers = [_filled_layer()(offset + n) for _ in range(lm.spec.num_layers)]
        if past is not None:
            for i, (k, v) in enumerate(zip(past.keys, past.values)):
                cache.update(k[None], v[None], i)
    past = cache
    queries = None
    if capture_queries:
        rows = n if query_positions is None else len(query_positions)
        queries = {i: QueryBuffer(lm.spec.num_heads, rows, lm.spec.head_dim, lm.device, lm.model.dtype)
                   for i in range(lm.spec.num_layers)}
    logits = None
    nll = torch.zeros(n, device=ids.device) if token_nll else None
    qp = query_positions.to(ids.device) if queries is not None and query_positions is not None else None
    for start in range(0, n, chunk_size):
        chunk = ids[:, start:start + chunk_size]
        pos = torch.arange(offset + start, offset + start + chunk.shape[1], device=ids.device)[None]
        keep = qp[(qp >= start) & (qp < start + chunk.shape[1])] - start if qp is not None else None
        kwargs = dict(input_ids=chunk, past_key_values=past, use_cache=True, position_ids=pos,
                      kvcat_queries=queries, kvcat_query_rows=keep)
        if token_nll:  # hidden state i predicts token i + 1 (the next chunk's first token included)
            hidden = lm.model.get_decoder()(**kwargs).last_hidden_state[0]
            end = min(start + chunk.shape[1] + 1, n)
            nll[start + 1:end] = _chunk_nll(lm, hidden[:end - start - 1], ids[0, start + 1:end])
            logits = lm.model.get_output_embeddings()(hidden[-1])
            del hidden
        else:
            logits = lm.model(**kwargs, logits_to_keep=1).logits[0, -1]
    keys = [layer.keys[0] for layer in past.layers]
    values = [layer.values[0] for layer in past.layers]
    q = [queries[i].data for i in range(len(keys))] if queries is not None else None
    release_free_memory()  # the chunks' activations
    return Prefill(keys=keys, values=values, queries=q, last_logits=logits.float(), token_nll=nll)


@torch.no_grad()
def local_surprisal(lm: LoadedModel, tokens, context: int = 128, window: int = 512) -> torch.Tensor:
    """[N] surprisal of each token given only the `context` to `window - 1` tokens before it (overlapping
    windows of `window` tokens, one at a time; fewer for the document's first tokens). Unlike the prefill's
    surprisal, given everything before it, a span here stays surprising when the document has already shown
    its pattern: the fourth fact of a list of like facts scores as high as the first."""
    if not 0 < context < window:
        raise ValueError(f"need 0 < context < window, got context {context}, window {window}")
    ids = as_ids(tokens, lm.device)[0]
    n = ids.numel()
    nll = torch.zeros(n, device=ids.device)
    for start in range(0, max(n - context, 1), window - context):
        seg = ids[start:start + window]
        hidden = lm.model.get_decoder()(input_ids=seg[None], use_cache=False).last_hidden_state[0]
        # hidden[j] predicts token start + j + 1; a later window scores only tokens with `context` before them
        first = 0 if start == 0 else context - 1
        nll[start + first + 1:start + seg.numel()] = _chunk_nll(lm, hidden[first:-1], seg[first + 1:])
        del hidden
    return nll


@functools.cache
def _peek_layer() -> type:
    """A cache layer that lets attention see past + new K/V but stores nothing new (queries-only passes);
    built on first use so importing this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class PeekLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor):  # [H, N, d]: viewed, not copied
            super().__init__()
            self.lazy_initialization(keys[None], values[None])
            self.keys, self.values = keys[None], values[None]

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return PeekLayer


@functools.cache
def _filled_layer() -> type:
    """A cache layer whose K/V buffers of the final length are allocated once and filled chunk by chunk;
    attention sees the filled part. Growing by concatenation (transformers' DynamicLayer) copies the cache
    at every chunk and leaves the freed smaller copies as heap slack: a 4,096-token SmolLM2-135M prefill in
    512-token chunks held 272 MB above the warm model for 180 MB of K/V."""
    from transformers.cache_utils import DynamicLayer

    class FilledLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.filled = capacity, 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                b, h, _, d = key_states.shape
                self._keys = key_states.new_empty(b, h, self.capacity, d)
                self._values = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            end = self.filled + key_states.shape[-2]
            if end > self.capacity:
                raise ValueError(f"prefill cache holds {self.capacity} tokens; {end} were written")
            self._keys[:, :, self.filled:end] = key_states
            self._values[:, :, self.filled:end] = value_states
            self.filled = end
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

    return FilledLayer


def full_cache(pre: Prefill, fingerprint: str, method: str = "full") -> CompactCache:
    """The identity 'compaction': every key kept, beta = 0, C_v = V."""
    return CompactCache(keys=list(pre.keys), values=list(pre.values),
                        beta=[torch.zeros(k.shape[:2], dtype=torch.float32, device=k.device) for k in pre.keys],
                        num_tokens=pre.num_tokens, model_fingerprint=fingerprint, method=method)


class CacheSession:
    """New tokens run over a CompactCache (or over no context). Each session owns its own copy of the
    cache, so several questions can be asked of one compacted context without recompaction."""

    def __init__(self, lm: LoadedModel, cache: CompactCache | None):
        from transformers import DynamicCache

        self.lm = lm
        use_kvcat_attention(lm.model)
        self.past = DynamicCache(config=lm.model.config)
        self.position = 0
        self.bias = None
        if cache is not None:
            cache.check_model(lm.spec.fingerprint)
            dtype = lm.model.dtype
            self.bias = []
            for i in range(cache.num_layers):  # a hybrid cache's side slots follow its paged ones
                k, v, b = cache.layer_view(i)
                self.past.update(k[None].to(lm.device, dtype), v[None].to(lm.device, dtype), i)
                self.bias.append(b.to(lm.device))
            self.position = cache.num_tokens

    @torch.no_grad()
    def forward(self, tokens, queries: dict[int, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Append tokens; returns logits [len, vocab] (float32), row i predicting the token after tokens[i].
        With `queries`, each layer's post-RoPE queries of these tokens are appended to queries[layer]."""
        ids = as_ids(tokens, self.lm.device)
        q = ids.shape[1]
        if self.position + q > self.lm.spec.max_positions:
            raise ContextTooLongError(self.position + q, self.lm.spec.max_positions, "context plus input")
        pos = torch.arange(self.position, self.position + q, device=ids.device)[None]
        out = self.lm.model(input_ids=ids, past_key_values=self.past, use_cache=True, position_ids=pos,
                            kvcat_bias=self.bias, kvcat_queries=queries)
        self.position += q
        return out.logits[0].float()

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int | None = None, stop_ids: set[int] | None = None) -> list[int]:
        """Greedy (temperature 0) or sampled continuation of `prompt`; stops at EOS or a stop id."""
        stop = set(stop_ids or ())
        if self.lm.tokenizer.eos_token_id is not None:
            stop.add(self.lm.tokenizer.eos_token_id)
        gen = torch.Generator(device=self.lm.device)
        if seed is not None:
            gen.manual_seed(seed)
        logits = self.forward(prompt)[-1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            if temperature <= 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            if token in stop:
                break
            out.append(token)
            if self.position >= self.lm.spec.max_positions:
                break
            logits = self.forward([token])[-1]
        return out


def continuation_nll(lm: LoadedModel, cache: CompactCache | None, continuation) -> torch.Tensor:
    """Per-token negative log-likelihood of continuation[1:] given the cache and continuation[:i]."""
    ids = as_ids(continuation, lm.device)[0]
    logits = CacheSession(lm, cache).forward(ids)
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
