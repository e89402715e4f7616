"""Chat prompts split into a compressible context prefix and a question suffix.

The user turn is `<document>\n\n<question>`, rendered with the model's chat template (SmolLM2's ChatML
template injects its default system prompt). The context ids (template head with the system prompt, the
document, and as much of the blank line as tokenizes the same alone as inside the chat: one newline for
SmolLM2) form a prefix that is prefilled and compacted once; the question ids (rest of the blank line,
question, end of turn, assistant generation prompt) are appended later, for as many questions as wanted.
Concatenated, the two equal the tokenization of the whole chat; `tests/test_data.py` checks it.
"""

from __future__ import annotations

from typing import NamedTuple

_MARK = "\x00KVCAT-CONTENT\x00"
SEPARATOR = "\n\n"


class ChatPrompt(NamedTuple):
    """Unpacks as `context_ids, question_ids = context_and_question(...)`."""

    context_ids: list[int]  # compressible prefix (empty-document prompts still hold the template head)
    question_ids: list[int]  # appended after the (compacted) context; ends with the generation prompt

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.question_ids


def _template_parts(tokenizer) -> tuple[str, str]:
    """The rendered chat around the user content: (head, tail)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                             add_generation_prompt=True)
        if text.count(_MARK) != 1:
            raise ValueError("the chat template does not place the user message verbatim")
        head, tail = text.split(_MARK)
    else:  # a base model without a template: plain text
        head, tail = "", "\nAnswer:"
    return head, tail


def _encode(tokenizer, text: str) -> list[int]:
    # The template text already holds any special tokens (BOS, <|im_start|>); add none of our own.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_text(tokenizer, context: str, question: str) -> str:
    """The whole chat as text: what `context_ids + question_ids` tokenizes from."""
    head, tail = _template_parts(tokenizer)
    body = f"{context.strip()}{SEPARATOR}{question.strip()}" if context.strip() else question.strip()
    return head + body + tail


_PROBES = (("A short probe document.", "What is it?"), ("Numbers: 1, 2 and 3", "12 or 13?"),
           ('He said "yes"!', '"Why?" she asked.'), ("Ends with a colon:", "(a) or (b)?"))
_SPLITS: dict[tuple, int] = {}


def _separator_split(tokenizer) -> int:
    """How many characters of the blank line between document and question belong to the context.

    Byte-level BPE merges a trailing "\n\n" into one token, but inside the chat, before the question, it
    is two; so the boundary must fall where both tokenizations agree. Found once per tokenizer by probing.
    """
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), getattr(tokenizer, "chat_template", None))
    if key not in _SPLITS:
        head, tail = _template_parts(tokenizer)
        for k in range(len(SEPARATOR), -1, -1):
            if all(_encode(tokenizer, f"{head}{c}{SEPARATOR[:k]}") + _encode(tokenizer, f"{SEPARATOR[k:]}{q}{tail}")
                   == _encode(tokenizer, f"{head}{c}{SEPARATOR}{q}{tail}") for c, q in _PROBES):
                _SPLITS[key] = k
                break
        else:
            raise ValueError("this tokenizer merges tokens across the document/question boundary of the chat; "
                             "kvcat cannot split its prompts into a context prefix and a question")
    return _SPLITS[key]


def context_text(tokenizer, context: str) -> str:
    """The compressible prefix as text: template head, the document, and (part of) the blank line."""
    head, _ = _template_parts(tokenizer)
    if not context.strip():
        return head
    return f"{head}{context.strip()}{SEPARATOR[:_separator_split(tokenizer)]}"


def context_ids(tokenizer, context: str) -> list[int]:
    """The compressible prefix for a document, as token ids (see `context_text`)."""
    return _encode(tokenizer, context_text(tokenizer, context))


def question_ids(tokenizer, question: str, after_context: bool = True) -> list[int]:
    """What follows a context prefix: (the rest of the blank line,) the question, the end of the user turn
    and the assistant generation prompt. `after_context=False` for a prompt with no document."""
    _, tail = _template_parts(tokenizer)
    lead = SEPARATOR[_separator_split(tokenizer):] if after_context else ""
    return _encode(tokenizer, f"{lead}{question.strip()}{tail}")


def context_and_question(tokenizer, context: str, question: str) -> ChatPrompt:
    """Split a one-turn chat into context ids (compressed once) and question ids (appended later).

    With an empty context the context ids are just the template head (system prompt, user-turn start):
    the "no context" prompt asks the same question with nothing before it.
    """
    return ChatPrompt(context_ids(tokenizer, context),
                      question_ids(tokenizer, question, after_context=bool(context.strip())))


def full_chat_ids(tokenizer, context: str, question: str) -> list[int]:
    """Reference tokenization of the whole chat, through the tokenizer's own chat template."""
    body = f"{context.strip()}{SEPARATOR}{question.strip()}" if context.strip() else question.strip()
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=True,
                                            add_generation_prompt=True)
        out = out["input_ids"] if hasattr(out, "keys") else out
        return list(out)
    return _encode(tokenizer, chat_text(tokenizer, context, question))
