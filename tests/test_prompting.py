"""The server's context/question split: context + question tokens equal the whole chat, for every form."""

from __future__ import annotations

import pytest

from kvcat.server import prompting

DOC = "The lighthouse was built in 1823 by Elias Brandt.  "
TURNS = [{"role": "user", "content": "Who built it?"}, {"role": "assistant", "content": "Elias Brandt."},
         {"role": "user", "content": "When?"}]


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny.tokenizer


@pytest.mark.parametrize("turns", [1, 3])
def test_text_document_split_is_the_whole_chat(tok, turns):
    ctx = prompting.context_ids(tok, {"text": DOC})
    question = prompting.question_ids(tok, {"text": DOC}, TURNS[:turns])
    chat = [{"role": "user", "content": f"{DOC.strip()}\n\n{TURNS[0]['content']}"}, *TURNS[1:turns]]
    assert ctx + question == prompting.plain_ids(tok, chat)


def test_message_document_split_is_the_whole_chat(tok):
    source = {"messages": [{"role": "system", "content": "You answer from the notes."},
                           {"role": "user", "content": DOC}, {"role": "assistant", "content": "Noted."}]}
    ctx = prompting.context_ids(tok, source)
    question = prompting.question_ids(tok, source, TURNS[:1])
    assert ctx + question == prompting.plain_ids(tok, [*source["messages"], TURNS[0]])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "q"}], "system"),
    ([{"role": "assistant", "content": "a"}], "start with a user message"),
])
def test_bad_questions_over_a_context(tok, messages, match):
    with pytest.raises(prompting.PromptError, match=match):
        prompting.question_ids(tok, {"text": DOC}, messages)
