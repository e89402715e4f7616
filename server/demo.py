"""The served demo (`kvcat demo`, what `make demo` runs): one long document, compacted once, asked twice.

Starts `kvcat serve` on loopback, POSTs a long document (Paul Graham essays with one planted fact) to
`/v1/compact`, asks questions through the official `openai` client with `extra_body={"kv_context": id}`,
asks the same question with the whole document sent as plain chat for comparison, prints the answers, the
KV memory saved and the time to first token, and stops the server.
"""

from __future__ import annotations

import time

from rich.table import Table

from kvcat.console import console
from kvcat.demo import DemoConfig


def _ask(client, model: str, question: str, context: str | None = None, document: str | None = None,
         max_tokens: int = 32) -> tuple[str, float]:
    """Stream one greedy answer; returns (text, seconds to the first token)."""
    content = question if document is None else f"{document}\n\n{question}"
    extra = {"kv_context": context} if context else None
    start = time.perf_counter()
    first, parts = None, []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                            max_tokens=max_tokens, temperature=0.0, stream=True,
                                            extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts).strip(), first if first is not None else float("nan")


def served_demo(config: DemoConfig = DemoConfig()) -> dict:
    import httpx
    from transformers import AutoTokenizer

    from kvcat.config import choose_dtype
    from kvcat.data import needle_example
    from kvcat.models import resolve
    from kvcat.server.launch import ServerProcess

    model, method, ratio, dtype = config.model, config.method, config.ratio, config.dtype
    _, path = resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    example = needle_example(tokenizer, length=config.context_tokens, depth=0.4, seed=config.seed)
    console.print(f"[bold]starting[/] kvcat serve --model {model} --dtype {dtype} (vLLM engine, tens of seconds)")
    with ServerProcess(model, dtype=dtype, max_model_len=8192) as srv:
        engine = httpx.get(srv.url("/version"), timeout=30).json()["dtypes"]["engine"]
        console.print(f"server ready at {srv.base} in {srv.startup_s:.0f} s; engine dtype [bold]{engine['dtype']}[/] "
                      f"({engine['reason']})")
        client = srv.openai()
        console.print(f"[bold]POST /v1/compact[/]: {config.context_tokens}-token document, {method}, ratio {ratio:g}")
        resp = httpx.post(srv.url("/v1/compact"), timeout=1800,
                          json={"text": example.document, "ratio": ratio, "method": method})
        if resp.status_code != 200:
            raise RuntimeError(f"/v1/compact answered {resp.status_code}: {resp.text}")
        ctx = resp.json()
        console.print(f"context {ctx['id']}: {ctx['original_tokens']} -> {ctx['compacted_tokens']} slots in "
                      f"{ctx['compaction_seconds']:.1f} s; KV memory {ctx['kv_bytes_full'] / 2**20:.1f} MiB -> "
                      f"{ctx['kv_bytes_compacted'] / 2**20:.2f} MiB "
                      f"({ctx['kv_bytes_full'] / ctx['kv_bytes_compacted']:.1f}x smaller)")
        served = client.models.list().data[0].id
        questions = [example.question, "In one sentence, what is the text about?"]
        table = Table("question", "over", "answer", "TTFT s")
        answers = []
        for q in questions:
            text, ttft = _ask(client, served, q, context=ctx["id"])
            answers.append({"question": q, "mode": "compacted", "answer": text, "ttft_s": ttft})
            table.add_row(q, f"compacted ({ratio:g}x)", text, f"{ttft:.3f}")
        text, ttft = _ask(client, served, example.question, document=example.document)
        answers.append({"question": example.question, "mode": "full", "answer": text, "ttft_s": ttft})
        table.add_row(example.question, "full document", text, f"{ttft:.3f}")
        text, ttft = _ask(client, served, example.question)
        answers.append({"question": example.question, "mode": "none", "answer": text, "ttft_s": ttft})
        table.add_row(example.question, "no document", text, f"{ttft:.3f}")
        console.print(table)
        console.print(f"expected answer: [bold]{example.answers[0]}[/]")
        full_ttft = answers[2]["ttft_s"]  # vLLM's cold prefill of the whole document, in this run
        fast = choose_dtype("auto", "engine").dtype
        caveat = "" if engine["dtype"] == fast else f"; not the dtype auto picks here ({fast}), so not a fair base"
        console.print(f"/v1/compact took {ctx['compaction_seconds']:.1f} s = "
                      f"{ctx['compaction_seconds'] / full_ttft:.1f}x the {engine['dtype']} engine's cold prefill of "
                      f"the document ({full_ttft:.1f} s to the first token{caveat}); each question over the compacted "
                      f"context saves {full_ttft - answers[0]['ttft_s']:.1f} s of it")
        saved = httpx.get(srv.url("/metrics"), timeout=30).text
        line = next((ln for ln in saved.splitlines() if ln.startswith("kvcat_kv_saved_bytes{")), "")
        console.print(f"/metrics: {line}")
    console.print("server stopped")
    return {"context": ctx, "answers": answers, "expected": example.answers[0], "engine_dtype": engine}
