"""On-the-fly compaction: long prompts are compacted without a separate /v1/compact call.

Policy (`AutoCompaction`: server flags, overridable per request with the `kv_compaction` field): when a plain
chat request's prompt exceeds `threshold_tokens`, its leading part is compacted and the most recent
`keep_turns` user turns (the question included) stay uncompressed; a text completion's prompt is cut after
its last whole KV block that leaves at least `keep_tokens` tokens uncompressed (`token_cut`), and its
leading blocks are stored under a hash of their token ids. Two shapes of chat prompt can be split:
- several messages: the leading messages (system prompt, documents, older turns) up to the start of the
  kept user turns become a chat-message context;
- one user message `document + "\\n\\n" + question`: the document becomes a text context (as in /v1/compact).

The compacted part is stored under a content hash of what it stands for (model, rendered source, method,
ratio, beta mode), so the next request that starts with the same messages reuses it (a hit); any change to
an earlier turn changes the hash (a miss, never a stale cache). A growing conversation reuses its longest
stored prefix: while the turns after it stay under the threshold they are sent uncompressed; past it, only
the new turns are compacted and joined to the stored block (`kvcat.compaction.incremental.extend`).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, replace

from kvcat import prompts
from kvcat.defaults import DEFAULT_METHOD
from kvcat.server import prompting

SEPARATOR = "\n\n"


class AutoCompactionError(ValueError):
    """A bad on-the-fly compaction policy (threshold, ratio, method, keep_turns)."""


@dataclass(frozen=True)
class AutoCompaction:
    threshold_tokens: int | None = None  # None: off
    ratio: float = 10.0
    method: str = DEFAULT_METHOD
    keep_turns: int = 1
    keep_tokens: int = 256  # text completions: the prompt's last tokens stay uncompressed (at least this many)
    max_contexts: int = 64  # on-the-fly contexts kept per tenant (least recently used evicted; not in the quota)

    @property
    def enabled(self) -> bool:
        return self.threshold_tokens is not None

    def merged(self, override) -> "AutoCompaction":
        """This policy with a request's `kv_compaction` field applied ("off", or a dict of fields)."""
        if override is None:
            return self
        if override == "off" or override is False:
            return replace(self, threshold_tokens=None)
        return replace(self, **{k: v for k, v in override.items() if v is not None})

    def validate(self, block_size: int, method_names: list[str]) -> None:
        if not self.enabled:
            return
        minimum = 2 * block_size
        if self.threshold_tokens < minimum:
            raise AutoCompactionError(f"threshold_tokens {self.threshold_tokens} is below this server's minimum of "
                                      f"{minimum} (two KV blocks of {block_size} tokens)")
        if not self.ratio > 1:
            raise AutoCompactionError(f"ratio must be above 1, got {self.ratio}")
        if self.threshold_tokens / self.ratio < block_size:
            raise AutoCompactionError(
                f"ratio {self.ratio:g} compacts a {self.threshold_tokens}-token prompt to "
                f"{self.threshold_tokens / self.ratio:.0f} slots, fewer than one KV block ({block_size}); raise "
                "threshold_tokens or lower the ratio")
        if self.method not in method_names:
            raise AutoCompactionError(f"unknown compaction method {self.method!r}; choose one of "
                                      f"{', '.join(method_names)}")
        if self.max_contexts < 1:
            raise AutoCompactionError(f"max_contexts must be at least 1, got {self.max_contexts}")
        if self.keep_turns < 1:
            raise AutoCompactionError(f"keep_turns must be at least 1, got {self.keep_turns}")
        if self.keep_tokens < 1:
            raise AutoCompactionError(f"keep_tokens must be at least 1, got {self.keep_tokens}")


@dataclass(frozen=True)
class Split:
    """A prompt split into a compactable source and the uncompressed messages that follow it."""

    source: dict  # {"messages": [...]} or {"text": ...}, as /v1/compact takes it
    rest: list[dict]  # the kept turns: what is sent uncompressed after the context
    prefixes: list[tuple[dict, list[dict]]]  # shorter (source, rest) splits of the same prompt, longest first


def _text_split(message: dict) -> tuple[str, str] | None:
    """A user message `document + "\n\n" + question` as (document, question)."""
    content = message["content"].strip()
    if message["role"] != "user" or SEPARATOR not in content:
        return None
    document, question = content.rsplit(SEPARATOR, 1)
    return (document, question) if document.strip() and question.strip() else None


def split(messages: list[dict], keep_turns: int) -> Split | None:
    """Where to cut `messages`; None when nothing can be compacted without changing the prompt."""
    first = _text_split(messages[0])
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if len(users) >= keep_turns and users[-keep_turns] > 0:
        cut = users[-keep_turns]
        if any(m["role"] in ("system", "developer") for m in messages[cut:]):
            return None  # a system message among the kept turns cannot follow a compacted context
        prefixes = [({"messages": messages[:j]}, messages[j:]) for j in reversed(users) if 0 < j < cut]
        if first is not None:  # a first turn "document\n\nquestion", compacted as a text document earlier
            prefixes.append(({"text": first[0]}, [{"role": "user", "content": first[1]}, *messages[1:]]))
        return Split({"messages": messages[:cut]}, messages[cut:], prefixes)
    if len(messages) == 1 and first is not None:
        return Split({"text": first[0]}, [{"role": "user", "content": first[1]}], [])
    return None


def token_cut(num_tokens: int, keep_tokens: int, block_size: int) -> int:
    """Where a text prompt of `num_tokens` is cut: after its last whole KV block that leaves at least
    `keep_tokens` after it (0: nothing to compact). Whole blocks keep the cuts of a growing prompt stable, so
    its later requests find the context an earlier one stored."""
    return max(0, (num_tokens - keep_tokens) // block_size * block_size)


def token_sources(ids: list[int], cuts: list[int]) -> dict[int, dict]:
    """The store source of each leading part `ids[:cut]`: its length and a hash of its token ids (one pass)."""
    digest, out, done = hashlib.sha256(), {}, 0
    for cut in sorted(cuts):
        digest.update(array("q", ids[done:cut]).tobytes())
        done = cut
        out[cut] = {"token_ids": {"count": cut, "sha256": digest.copy().hexdigest()}}
    return out


def context_key(fingerprint: str, source: dict, policy: AutoCompaction, beta: bool, tenant: str,
                versions: dict | None = None) -> str:
    """The store id of the compacted form of `source` under `policy` for `tenant`: a content hash (one tenant's
    prompts never hit another's contexts). `versions` names whatever else decides the compacted K/V (tokenizer,
    chat template, the method's parameters, kvcat's version), so an upgrade never serves a stale context."""
    blob = json.dumps({"fingerprint": fingerprint, "source": source, "method": policy.method,
                       "ratio": policy.ratio, "beta": beta, "tenant": tenant, "versions": versions or {}},
                      sort_keys=True, ensure_ascii=False, default=str)
    return "ctx-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def _rendered(tokenizer, source: dict) -> str:
    if "text" in source:
        return prompts.context_text(tokenizer, source["text"])
    return prompting.render(tokenizer, source["messages"], False)


def new_tokens(tokenizer, old: dict, new: dict) -> list[int] | None:
    """Tokens that a context `new` adds after its prefix `old` (None if `old` does not render as a prefix of
    `new`, token for token; the new context is then compacted from scratch)."""
    before, after = _rendered(tokenizer, old), _rendered(tokenizer, new)
    if not after.startswith(before):
        return None
    ids = prompting.encode(tokenizer, after[len(before):])
    if prompting.context_ids(tokenizer, old) + ids != prompting.context_ids(tokenizer, new):
        return None
    return ids
