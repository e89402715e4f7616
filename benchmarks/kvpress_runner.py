"""The kvpress side of `kvcat bench peers`: run NVIDIA kvpress presses on token ids that kvcat prepared.

    .peers-venv/bin/python benchmarks/kvpress_runner.py JOB.json STORE.json

Runs in the peers venv (scripts/peers_venv.sh: kvpress needs transformers < 5.3), so it must not import
kvcat: kvcat tokenizes, prepares the held-out data and scores every output with its own metrics; this
script only turns token ids into numbers and texts (it borrows kvcat/bench_process.py's log and PeakRSS, a
standard-library-only file, by path). The job (JSON):

    {"model": "/path/to/hf/folder",
     "windows": [{"context": [ids], "continuation": [ids]}, ...],     # PPL windows
     "documents": [{"context": [ids], "questions": [[ids], ...]}, ...],  # each compressed once, then asked
     "runs": [["none", 1], ["snapkv", 8], ...],   # (press, kvcat ratio); "none" = no press; ratio 1 = cr 0
     "max_new_tokens": 24, "stop_ids": [2]}

The store (STORE.json, rewritten after every run) keeps the runs' raw records: {"versions": {...},
"model": folder name, "data_sha", "record_format", "runs": [{"press", "ratio", "compression_ratio", "windows":
[{"nll_sum", "count"}], "prompts": [{"ids", "text"}] (every document's questions in order), "compress_s": [...],
"kept_per_head": [mean entries per KV head kept, per window and document], "widest_head": [the most entries any
layer's head keeps, per window and document: what a paged engine, one slot count for every head, holds],
"peak_rss_mb", "seconds", "error"}]}. A run is saved after every window and document (marked "partial" until it
ends), so an interrupted run continues where it stopped. A stored run is reused, not run again, while its data
(`data_sha`: the job without its list of runs, the model's folder name and config), the versions of kvpress,
transformers and torch, and RECORD_FORMAT are the same: a change to kvcat's own methods never costs kvpress's
hours again. Stores of another job are replaced. (A store of the older format, keyed by the sha of the whole
job's JSON, is taken over when that sha matches.)

kvpress facts this relies on (kvpress 0.5.x):
- a press compresses during prefill only: `with press(model): model.model(input_ids=ctx, past_key_values=
  cache)` registers forward hooks on every attention layer, and each hook, on the pass that starts from an
  empty cache, replaces that layer's cached K/V by the kept subset (ScorerPress: the top-scored entries);
  AdaKV and KVzip instead keep every entry and mark pruned ones in `self_attn.masked_key_indices`, which
  kvpress's patched attention functions neutralize with a "fake key" in later passes;
- `compression_ratio` is the fraction of entries REMOVED: kvcat's ratio r (N / kept) is compression_ratio
  1 - 1/r. Here the kept count is matched to kvcat's budget round(N / r) exactly (kvpress keeps
  int(N * (1 - cr)) entries, so cr = 1 - (t + 0.01) / N, which is 1 - 1/r up to rounding);
- positions after a compressed prefill: the cache may hold t < N entries per layer, but the new tokens are
  the (N+1)-th, (N+2)-th, ... tokens of the text, so they get position_ids N, N+1, ... passed explicitly
  (as kvpress's own pipeline does in `generate_answer`). Without them transformers would derive positions
  from the cache length t and rotate the new queries and keys to the wrong RoPE angles. The attention mask
  and cache_position still follow the cache's real length (t + new tokens), which is what the cache holds;
- a document is compressed once and all its questions asked over it (as `/v1/compact` serves it): after each
  answer the cache is cropped back to its compressed length (`DynamicCache.crop`). Head-wise presses' masks
  (`masked_key_indices`) survive the answers: kvpress clears them only on a pass whose queries are as many as
  its keys (a prefill).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path


# Bump when what a run records or how it measures changes: stored runs of another format are run again.
RECORD_FORMAT = 2  # 2: documents asked several questions; widest_head


def _load_bench_process():
    """kvcat/bench_process.py loaded by path (it imports only the standard library), so that both sides of the
    comparison log alike and measure memory the same, exact way."""
    path = Path(__file__).resolve().parents[1] / "kvcat" / "bench_process.py"
    spec = importlib.util.spec_from_file_location("kvcat_bench_process_standalone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bench_process = _load_bench_process()
PeakRSS = _bench_process.PeakRSS
log = _bench_process.logger("kvpress runner")


# press name -> (kvpress class name, constructor keywords besides compression_ratio). Wrappers of a ScorerPress
# <name>: "adakv-<name>" (AdaKVPress, kvpress's head-wise budget allocation) and "chunkkv-<name>" (ChunkKVPress:
# whole chunks of CHUNK tokens ranked by their mean score, the same chunks in every head).
CHUNK = 20  # ChunkKV's default chunk length
WRAPPERS = {"adakv-": ("AdaKVPress", {}), "chunkkv-": ("ChunkKVPress", {"chunk_length": CHUNK})}
PRESSES = {
    "snapkv": ("SnapKVPress", {}),
    "expected-attention": ("ExpectedAttentionPress", {}),
    "kvzip": ("KVzipPress", {}),  # global budget: layers and heads keep what their scores earn
    "kvzip-layerwise": ("KVzipPress", {"layerwise": True}),  # the same count in every layer, uneven across heads
    "streaming-llm": ("StreamingLLMPress", {}),
    "tova": ("TOVAPress", {}),
    "knorm": ("KnormPress", {}),
    "pyramidkv": ("PyramidKVPress", {}),
    "compactor": ("CompactorPress", {}),  # leverage scores blended with non-causal chunked attention
    "leverage": ("LeverageScorePress", {}),
}
# Presses whose scores come from weights trained per model and fetched from the Hugging Face hub at first use:
# this project downloads nothing from a hub, and no such weights exist for SmolLM2, so they are recorded as
# not run (with this reason) instead of being attempted.
HUB_ONLY = {
    "fastkvzip": "FastKVzipPress loads trained gates from the hub (Jang-Hyun/Fast-KVzip), none for this model",
    "kvzap": "KVzapPress loads a trained scorer from the hub (nvidia/KVzap-*), none for this model",
}


class NotRun(Exception):
    """A press this project cannot run here, for a stated reason (recorded, not a failure of the press)."""


def make_press(name: str, compression_ratio: float):
    import kvpress

    for prefix, (wrapper, kwargs) in WRAPPERS.items():
        if name.startswith(prefix):
            return getattr(kvpress, wrapper)(press=make_press(name[len(prefix):], compression_ratio), **kwargs)
    if name in HUB_ONLY:
        raise NotRun(HUB_ONLY[name])
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; known: {', '.join([*PRESSES, *HUB_ONLY])} and "
                         + ", ".join(f"{p}<press>" for p in WRAPPERS))
    cls, kwargs = PRESSES[name]
    return getattr(kvpress, cls)(compression_ratio=compression_ratio, **kwargs)


def compression_ratio_for(n: int, ratio: float, press: str = "") -> float:
    """kvpress's fraction removed for kvcat's ratio r on an n-token context, keeping kvcat's round(n / r) entries
    (ChunkKV keeps int(chunks x (1 - cr)) whole chunks: round(n / r / CHUNK) of them, within half a chunk)."""
    if ratio <= 1:
        return 0.0
    t = max(1, min(n - 1, round(n / ratio)))
    if press.startswith("chunkkv-"):
        n, t = -(-n // CHUNK), max(1, round(t / CHUNK))
    return 1.0 - (t + 0.01) / n


def kept_slots(model, cache) -> tuple[float, int]:
    """KV entries attention can still see (entries minus those a head-wise press masked), per layer and KV
    head: their mean, and the most of any head (a paged engine gives every head that many slots)."""
    import torch

    counts = []
    for i, layer in enumerate(model.model.layers):
        keys = cache.layers[i].keys
        heads, n = keys.shape[1], keys.shape[2]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        kept = torch.full((heads,), n)
        if masked is not None:
            kept -= torch.bincount(masked[1].cpu(), minlength=heads)
        counts.append(kept)
    counts = torch.cat(counts)
    return float(counts.float().mean()), int(counts.max())


class Runner:
    def __init__(self, job: dict):
        import torch
        from transformers import AutoModelForCausalLM

        import kvpress  # noqa: F401  (patches the attention functions for head-wise presses)

        self.torch = torch
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
        self.stop = set(job.get("stop_ids") or [])
        self.max_new = int(job.get("max_new_tokens", 24))
        with torch.no_grad():  # warm-up: the first forward pass of a process is slow, keep it out of the timings
            self.model.model(input_ids=torch.arange(64)[None], use_cache=False)

    def prefill(self, context: list[int], press):
        """The context through the model under the press (kvpress's way: the base model without the LM head,
        in one pass from an empty cache, so the hooks see the prefill). Returns (cache, seconds)."""
        from transformers import DynamicCache

        torch = self.torch
        ids = torch.tensor([context], dtype=torch.long)
        cache = DynamicCache()
        start = time.perf_counter()
        if press is None:
            self.model.model(input_ids=ids, past_key_values=cache, use_cache=True)
        else:
            with press(self.model):
                self.model.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return cache, time.perf_counter() - start

    def forward(self, cache, ids: list[int], position: int):
        """New tokens after the (compressed) context, at their true positions position, position + 1, ..."""
        torch = self.torch
        x = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(position, position + len(ids))[None]
        return self.model(input_ids=x, past_key_values=cache, position_ids=pos, use_cache=True).logits[0].float()

    def nll(self, cache, context: list[int], continuation: list[int]) -> tuple[float, int]:
        """Sum and count of the NLL of continuation[1:] given the cache and continuation[:i] (kvcat's
        continuation_nll: the first continuation token is input only)."""
        torch = self.torch
        logits = self.forward(cache, continuation, len(context))
        target = torch.tensor(continuation[1:], dtype=torch.long)
        loss = torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum")
        return float(loss), len(continuation) - 1

    def generate(self, cache, context: list[int], question: list[int], max_new: int) -> list[int]:
        """Greedy answer, as kvcat's CacheSession.generate: stop ids end it and are not part of it."""
        position = len(context)
        logits = self.forward(cache, question, position)[-1]
        position += len(question)
        out: list[int] = []
        for _ in range(max_new):
            token = int(logits.argmax())
            if token in self.stop:
                break
            out.append(token)
            logits = self.forward(cache, [token], position)[-1]
            position += 1
        return out

    def run(self, job: dict, name: str, ratio: float, tokenizer, partial: dict | None = None,
            save=lambda rec: None) -> dict:
        """One press at one ratio over every window and document of the job. `partial`: the unfinished record of
        an interrupted run, continued after the last item it holds; `save(rec)` is called after each item with the
        unfinished record (`"partial": True`)."""
        torch = self.torch
        rec = partial or {"press": name, "ratio": ratio, "compression_ratio": [], "windows": [], "prompts": [],
                          "compress_s": [], "kept_per_head": [], "widest_head": [], "peak_rss_mb": None,
                          "seconds": 0.0, "error": None}
        rec["partial"] = True
        start = time.perf_counter() - rec["seconds"]
        peak = rec["peak_rss_mb"] or 0.0
        items = [("windows", w) for w in job.get("windows", [])] + [("documents", d) for d in job.get("documents", [])]
        try:
            # one press object per run (KVzip warns on every construction); its ratio is set per context
            press = None if name == "none" else make_press(name, 0.0)
            with torch.no_grad():
                for kind, item in items[len(rec["kept_per_head"]):]:  # one entry per item done
                    ctx = list(item["context"])
                    cr = compression_ratio_for(len(ctx), ratio, name)
                    if press is not None:
                        press.compression_ratio = cr  # the wrappers forward it to the press they wrap
                    with PeakRSS() as mem:
                        cache, sec = self.prefill(ctx, press)
                    peak = max(peak, mem.peak)
                    mean, widest = kept_slots(self.model, cache)
                    rec["kept_per_head"].append(round(mean, 2))
                    rec["widest_head"].append(widest)
                    rec["compression_ratio"].append(cr)
                    rec["compress_s"].append(round(sec, 4))
                    if kind == "windows":
                        s, c = self.nll(cache, ctx, list(item["continuation"]))
                        rec["windows"].append({"nll_sum": s, "count": c})
                    else:
                        compressed = cache.get_seq_length()
                        for question in item["questions"]:
                            ids = self.generate(cache, ctx, list(question), self.max_new)
                            rec["prompts"].append({"ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True)})
                            cache.crop(compressed)  # the next question sees the compressed document only
                    del cache
                    rec["peak_rss_mb"], rec["seconds"] = round(peak, 1), round(time.perf_counter() - start, 2)
                    save(rec)
        except NotRun as exc:
            rec["error"] = f"not run: {exc}"
        except Exception as exc:  # a press that does not support this model (or these lengths): record it
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc(limit=6)
        rec["peak_rss_mb"] = round(peak, 1) if peak else None
        rec["seconds"] = round(time.perf_counter() - start, 2)
        del rec["partial"]
        return rec


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("kvpress", "transformers", "torch")}


def data_sha(job: dict) -> str:
    """What a run's records depend on besides the press and ratio: the job without its runs (token ids,
    generation settings) and the model, by folder name and config (its absolute path is this machine's)."""
    model = Path(job["model"])
    config = (model / "config.json").read_text() if (model / "config.json").is_file() else ""
    data = {k: v for k, v in job.items() if k not in ("runs", "model")}
    text = json.dumps({"data": data, "model": model.name, "config": config}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def stored_runs(out: Path, store: dict, job_sha: str) -> list[dict]:
    """The runs of `out` this job may reuse (same data, versions and record format; a failed run is run
    again, a press that cannot run here is not), or none."""
    if not out.is_file():
        return []
    old = json.loads(out.read_text())
    same_data = old.get("data_sha") == store["data_sha"] or (
        "data_sha" not in old and old.get("job_sha") == job_sha)  # the older format: the whole job's sha
    if same_data and old.get("versions") == store["versions"] and \
            old.get("record_format", RECORD_FORMAT) == RECORD_FORMAT:
        kept = [r for r in old["runs"] if not r.get("error") or r["error"].startswith("not run")]
        unfinished = sum(bool(r.get("partial")) for r in kept)
        log(f"reusing the {len(kept) - unfinished} runs stored in {out}"
            + (f", continuing {unfinished} unfinished" if unfinished else "")
            + (f" ({len(old['runs']) - len(kept)} failed runs are run again)" if len(kept) < len(old["runs"]) else ""))
        return kept
    log(f"the runs stored in {out} are of other data, versions or record format: they are replaced")
    return []


def _save(store: dict, out: Path) -> None:
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(store, indent=1))
    tmp.replace(out)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit("usage: kvpress_runner.py JOB.json STORE.json")
    text = Path(argv[0]).read_text()
    job, out = json.loads(text), Path(argv[1])
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    store = {"versions": versions(), "model": Path(job["model"]).name, "data_sha": data_sha(job),
             "record_format": RECORD_FORMAT, "runs": []}
    store["runs"] = stored_runs(out, store, hashlib.sha256(text.encode()).hexdigest())
    finished = {(rec["press"], float(rec["ratio"])) for rec in store["runs"] if not rec.get("partial")}
    runs = [(str(p), float(r)) for p, r in job["runs"] if (str(p), float(r)) not in finished]
    items = len(job.get("windows", [])) + len(job.get("documents", []))
    log(f"kvpress {store['versions']['kvpress']}, transformers {store['versions']['transformers']}; "
        f"{len(job.get('windows', []))} windows, {len(job.get('documents', []))} documents, {len(runs)} runs to do")
    runner = Runner(job) if runs else None
    for i, (name, ratio) in enumerate(runs):
        others = [r for r in store["runs"] if (r["press"], float(r["ratio"])) != (name, ratio)]
        partial = next((r for r in store["runs"] if (r["press"], float(r["ratio"])) == (name, ratio)), None)
        if partial:
            log(f"run {i + 1}/{len(runs)}: {name} at {ratio:g}x continues after {len(partial['kept_per_head'])} of "
                f"{items} windows and documents")

        def save(rec, others=others):  # after every window and document: an interrupted run resumes there
            store["runs"] = others + [rec]
            _save(store, out)

        rec = runner.run(job, name, ratio, tokenizer, partial, save)
        save(rec)
        kept = rec["kept_per_head"]
        status = (f"FAILED ({rec['error']})" if rec["error"] else
                  f"kept {sum(kept) / max(len(kept), 1):.1f} slots/head on average")
        log(f"run {i + 1}/{len(runs)}: {name} at {ratio:g}x in {rec['seconds']} s: {status}")
    if not runs:  # nothing ran: the store is still written in this format (a taken-over older one converted)
        _save(store, out)


if __name__ == "__main__":
    main()
