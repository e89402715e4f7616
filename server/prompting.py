"""Splitting a chat into (compacted context, question) tokens, the same way evaluation does.

`kvcat.prompts.context_and_question` (data package) is the source of truth when present; this module
adapts the server's two document forms to it and keeps a local rendering with the same rule otherwise:

- text document: the conversation is one user turn `document + "\\n\\n" + question`; the context is the
  chat template's rendering up to and including the document and the blank line, the question the rest
  (question text, end of turn, assistant header). Later user/assistant turns follow in the question part.
- chat-message document: the context is the template rendering of those messages (no generation prompt),
  the question the rendering of the chat request's messages that follows it.
"""

from __future__ import annotations

SEPARATOR = "\n\n"


class PromptError(ValueError):
    pass


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _shared_split(tokenizer, document: str, question: str):
    try:
        from kvcat.prompts import context_and_question
    except ImportError:
        return None
    try:
        ctx, q = context_and_question(tokenizer, document, question)
    except TypeError:
        return None
    return list(ctx), list(q)


def context_ids(tokenizer, source: dict) -> list[int]:
    """Tokens of the context that gets compacted (source: {"text": ...} or {"messages": [...]})."""
    if "text" in source:
        shared = _shared_split(tokenizer, source["text"], "?")
        if shared is not None:
            return shared[0]
        return _encode(tokenizer, _text_prefix(tokenizer, source["text"]))
    return _encode(tokenizer, _render(tokenizer, source["messages"], False))


def _text_prefix(tokenizer, document: str) -> str:
    marker = "\x00KVCAT-QUESTION\x00"
    full = _render(tokenizer, [{"role": "user", "content": document + SEPARATOR + marker}], True)
    cut = full.index(marker)
    return full[:cut]


def question_ids(tokenizer, source: dict, messages: list[dict]) -> list[int]:
    """Tokens that follow the context for a chat request's `messages` (no system messages allowed: the
    system prompt belongs to the compacted context)."""
    if any(m["role"] in ("system", "developer") for m in messages):
        raise PromptError("a request over a kv_context cannot carry system messages: the system prompt is "
                          "part of the compacted context (send it in /v1/compact messages)")
    if not messages or messages[0]["role"] != "user":
        raise PromptError("a request over a kv_context must start with a user message (the question)")
    if "text" in source:
        document = source["text"]
        first, rest = messages[0], messages[1:]
        shared = _shared_split(tokenizer, document, first["content"]) if not rest else None
        if shared is not None:
            return shared[1]
        convo = [{"role": "user", "content": document + SEPARATOR + first["content"]}, *rest]
        full = _render(tokenizer, convo, True)
        prefix = _text_prefix(tokenizer, document)
    else:
        full = _render(tokenizer, [*source["messages"], *messages], True)
        prefix = _render(tokenizer, source["messages"], False)
    if not full.startswith(prefix):
        raise PromptError("the chat template does not render the context as a prefix of the conversation")
    return _encode(tokenizer, full[len(prefix):])


def plain_ids(tokenizer, messages: list[dict]) -> list[int]:
    return _encode(tokenizer, _render(tokenizer, messages, True))
