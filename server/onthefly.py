"""On-the-fly compaction inside chat: long prompts are compacted without a separate /v1/compact call.

Policy (`AutoCompaction`: server flags, overridable per request with the `kv_compaction` field): when a plain
chat request's prompt exceeds `threshold_tokens`, its leading part is compacted and the most recent
`keep_turns` user turns (the question included) stay uncompressed. Two shapes of prompt can be split:
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
from dataclasses import dataclass, replace

from kvcat.server import prompting

SEPARATOR = "\n\n"


class AutoCompactionError(ValueError):
    """A bad on-the-fly compaction policy (threshold, ratio, method, keep_turns)."""


@dataclass(frozen=True)
class AutoCompaction:
    threshold_tokens: int | None = None  # None: off
    ratio: float = 10.0
    method: str = "am-hak"
    keep_turns: int = 1

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
        if self.keep_turns < 1:
            raise AutoCompactionError(f"keep_turns must be at least 1, got {self.keep_turns}")


@dataclass(frozen=True)
class Split:
    """A prompt split into a compactable source and the uncompressed messages that follow it."""

    source: dict  # {"messages": [...]} or {"text": ...}, as /v1/compact takes it
    rest: list[dict]  # the kept turns: what is sent uncompressed after the context
    prefixes: list[int]  # for chat-message sources: shorter split points to look up (longest first)


def split(messages: list[dict], keep_turns: int) -> Split | None:
    """Where to cut `messages`; None when nothing can be compacted without changing the prompt."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if len(users) >= keep_turns and users[-keep_turns] > 0:
        cut = users[-keep_turns]
        if any(m["role"] in ("system", "developer") for m in messages[cut:]):
            return None  # a system message among the kept turns cannot follow a compacted context
        candidates = [i for i in users if 0 < i < cut]
        return Split({"messages": messages[:cut]}, messages[cut:], sorted(candidates, reverse=True))
    if len(messages) == 1 and messages[0]["role"] == "user" and SEPARATOR in messages[0]["content"].strip():
        document, question = messages[0]["content"].strip().rsplit(SEPARATOR, 1)
        if document.strip() and question.strip():
            return Split({"text": document}, [{"role": "user", "content": question}], [])
    return None


def context_key(fingerprint: str, source: dict, policy: AutoCompaction, beta: bool) -> str:
    """The store id of the compacted form of `source` under `policy`: a content hash."""
    blob = json.dumps({"fingerprint": fingerprint, "source": source, "method": policy.method,
                       "ratio": policy.ratio, "beta": beta}, sort_keys=True, ensure_ascii=False)
    return "ctx-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def new_tokens(tokenizer, old: dict, new: dict) -> list[int] | None:
    """Tokens that a chat-message context `new` adds after its prefix `old` (None if `old` does not render as
    a prefix of `new`, in which case the new context is compacted from scratch)."""
    before = prompting.render(tokenizer, old["messages"], False)
    after = prompting.render(tokenizer, new["messages"], False)
    if not after.startswith(before):
        return None
    ids = prompting.encode(tokenizer, after[len(before):])
    if prompting.context_ids(tokenizer, old) + ids != prompting.context_ids(tokenizer, new):
        return None
    return ids
