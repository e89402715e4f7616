"""Splitting a chat into (compacted context, question) tokens, the same way evaluation does.

`kvcat.prompts` is the source of truth for a text document: the conversation is one user turn
`document + "\\n\\n" + question`; the context is the chat template's rendering up to the document (and the
part of the blank line that tokenizes alike alone and in the chat), the question the rest. Later
user/assistant turns follow in the question part. For a chat-message document the context is the template
rendering of those messages (no generation prompt), the question the rendering of the request's messages
that follows it.
"""

from __future__ import annotations

from kvcat import prompts


class PromptError(ValueError):
    pass


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001  (the template's own checks raise assorted errors)
        raise PromptError(f"the model's chat template cannot render these messages: {exc}") from None


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_ids(tokenizer, source: dict) -> list[int]:
    """Tokens of the context that gets compacted (source: {"text": ...} or {"messages": [...]})."""
    if "text" in source:
        return prompts.context_ids(tokenizer, source["text"])
    return encode(tokenizer, render(tokenizer, source["messages"], False))


def question_ids(tokenizer, source: dict, messages: list[dict]) -> list[int]:
    """Tokens that follow the context for a chat request's `messages` (no system messages allowed: the
    system prompt belongs to the compacted context)."""
    if any(m["role"] in ("system", "developer") for m in messages):
        raise PromptError("a request over a kv_context cannot carry system messages: the system prompt is "
                          "part of the compacted context (send it in /v1/compact messages)")
    if not messages or messages[0]["role"] != "user":
        raise PromptError("a request over a kv_context must start with a user message (the question)")
    if "token_ids" in source:
        raise PromptError("this context holds a text completion's prompt tokens (no chat turns to continue): "
                          "continue it with /v1/completions")
    if "text" in source:
        document = source["text"]
        first, rest = messages[0], messages[1:]
        if not rest:
            return prompts.question_ids(tokenizer, first["content"])
        convo = [{"role": "user", "content": f"{document.strip()}{prompts.SEPARATOR}{first['content'].strip()}"},
                 *rest]
        full = render(tokenizer, convo, True)
        prefix = prompts.context_text(tokenizer, document)
    else:
        full = render(tokenizer, [*source["messages"], *messages], True)
        prefix = render(tokenizer, source["messages"], False)
    if not full.startswith(prefix):
        raise PromptError("the chat template does not render the context as a prefix of the conversation")
    return encode(tokenizer, full[len(prefix):])


def plain_ids(tokenizer, messages: list[dict]) -> list[int]:
    return encode(tokenizer, render(tokenizer, messages, True))
