"""KV-CAT training: policies, the masked pass, losses, saving, and bad input (tiny-random, short sequences)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from kvcat.training.checkpoint import META_FILE, _old, atomic_save, recover
from kvcat.training.config import TrainConfig, TrainConfigError
from kvcat.training.policies import POLICIES
from kvcat.training.trainer import Trainer

TINY = dict(model="tiny-random", seq_len=48, prefix_frac=0.75, batch_size=2, steps=2, warmup_steps=1,
            corpora=("paul_graham",), max_docs=4, seed=0, planted_frac=0.0)
CONTROL = dict(w_kl=0.0, w_anchor=0.0, w_answer=0.0)  # the NTP control's weights


def tiny_trainer(out=None, **overrides) -> Trainer:
    return Trainer(TrainConfig(**{**TINY, **overrides}), out, device="cpu", progress=False)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_each_policy_trains_with_finite_loss(policy):
    trainer = tiny_trainer(policy=policy, retention=0.5, **(CONTROL if policy == "ntp" else {}))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    summary = trainer.run()
    rows = trainer.history
    assert [r["step"] for r in rows] == [1, 2] and summary["steps"] == 2
    for row in rows:
        if policy == "ntp":  # the control: NTP only, no masked pass
            assert "kl" not in row and row["loss"] == pytest.approx(trainer.cfg.w_ntp * row["ntp"])
            continue
        assert all(math.isfinite(row[k]) for k in ("loss", "ntp", "kl", "anchor", "answer"))
        assert row["kl"] > 0  # half the prefix is hidden from the continuation
        if policy == "router":
            assert 0.3 < row["keep"] < 0.7 and math.isfinite(row["budget"])
        else:
            assert row["keep"] == pytest.approx(0.5, abs=0.02)
    if policy == "router":  # the router learns (its parameters moved)
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"ntp"}))
def test_masked_pass_with_full_retention_equals_full_pass(policy):
    trainer = tiny_trainer(policy=policy, retention=1.0)
    batch = trainer.data.batch([0, 1])
    with torch.no_grad():
        full, base, masked = trainer.forward_pair(batch, [0, 1])
    p = trainer.cfg.prefix_len
    assert masked.shape == full[:, p:].shape
    assert torch.allclose(masked, full[:, p:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["attn", "rand"])
def test_masked_pass_equals_a_cache_holding_only_the_kept_slots(policy):
    """Masking dropped slots must be exactly running the continuation over a compressed (gathered) cache."""
    from transformers import DynamicCache

    trainer = tiny_trainer(policy=policy, retention=0.5)
    batch = trainer.data.batch([3, 4])
    ids, p = batch.ids, trainer.cfg.prefix_len
    with torch.no_grad():
        full, _, masked = trainer.forward_pair(batch, [3, 4])
        keep = [torch.isfinite(b) for b in trainer.policy.slot_bias()]  # [B, KVH, P] per layer
        prefix = trainer.model(input_ids=ids[:, :p], use_cache=True).past_key_values
        small = DynamicCache(config=trainer.model.config)
        for i, layer in enumerate(prefix.layers):
            idx = keep[i].nonzero()[:, 2].view(*keep[i].shape[:2], -1)  # same count per head: top-k
            gather = idx[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
            small.update(layer.keys.gather(2, gather), layer.values.gather(2, gather), i)
        pos = torch.arange(p, ids.shape[1])[None].expand(2, -1)
        direct = trainer.model(input_ids=ids[:, p:], past_key_values=small, position_ids=pos).logits
    assert not torch.allclose(masked, full[:, p:], atol=1e-3)
    assert torch.allclose(masked, direct, atol=1e-4, rtol=0)


def test_policy_randomness_depends_only_on_the_sequence():
    trainer = tiny_trainer(policy="rand", retention=0.5)
    batch = trainer.data.batch([5, 6, 7])
    with torch.no_grad():
        trainer.forward_pair(batch, [5, 6, 7])
        together = [b[1] for b in trainer.policy.slot_bias()]
        trainer.forward_pair(trainer.data.batch([6]), [6])
        alone = [b[0] for b in trainer.policy.slot_bias()]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))


def test_router_is_differentiable_and_budget_pulls_to_target():
    trainer = tiny_trainer(policy="router", retention=0.25)
    parts = trainer.micro_step(trainer.data.batch([0, 1]), [0, 1])
    parts["loss"].backward()
    grads = {n: p.grad for n, p in trainer.policy.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    # Starting at the prior, the mean keep probability sits on the target: no budget pressure yet.
    assert parts["budget"].item() < 1e-3


def test_saved_folder_is_a_plain_hf_model(tmp_path):
    out = tmp_path / "run"
    trainer = tiny_trainer(out, policy="router", retention=0.5)
    trainer.run()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["policy"] == "router" and meta["retention"] == 0.5 and meta["steps"] == 2 and meta["complete"]
    assert len(meta["base_model"]["fingerprint"]) == 16 and meta["data"]["split"] == "train"
    assert "kvcat" not in (out / "config.json").read_text()
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as fh:
        names = set(fh.keys())
    own = {n for n, _ in trainer.model.named_parameters()} - {"lm_head.weight"}
    assert names == own  # the model's weights only: no router

    ids = trainer.data.batch([0]).ids[0, :16].tolist()
    trainer.model.eval()
    trainer.model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        expected = trainer.model(torch.tensor([ids])).logits[0, -1]
    # A fresh interpreter that never imports kvcat.
    code = ("import sys, json, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained({str(out)!r}); "
            f"print(json.dumps(m(torch.tensor([{ids}])).logits[0, -1].tolist())); "
            "assert not any(k.startswith('kvcat') for k in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    assert torch.allclose(got, expected, atol=1e-4)


# ---- atomic saves --------------------------------------------------------------------------------


def test_interrupted_save_never_replaces_a_good_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    atomic_save(out, lambda d: (d / "weights").write_text("good"))

    def broken(d):
        (d / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(out, broken)
    assert (out / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    # A kill between the two renames leaves only .ckpt.old: recover() puts it back.
    out.rename(_old(out))
    recover(out)
    assert (out / "weights").read_text() == "good" and not _old(out).exists()


# ---- bad input: clear errors before any compute ---------------------------------------------------


@pytest.fixture
def cli(monkeypatch):
    """The `train` command alone, with weight loading forbidden: errors must come before any compute."""
    from kvcat.training import cli as training_cli

    def no_compute(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr("kvcat.models.load_model", no_compute)
    app = typer.Typer()
    training_cli.register(app)  # its one command: the app runs it without naming it
    return lambda *args: CliRunner().invoke(app, list(args))


BASE_ARGS = ["--model", "tiny-random", "--seq-len", "48", "--corpora", "paul_graham", "--docs", "4",
             "--batch-size", "2", "--steps", "2", "--planted-frac", "0", "--no-progress"]


@pytest.mark.parametrize("args, message", [
    (["--retention", "0"], "retention must be in (0, 1]"),
    (["--retention", "1.5"], "retention must be in (0, 1]"),
    (["--policy", "h2o"], "unknown policy 'h2o'"),
    (["--seq-len", "9000"], "exceeds the model's 8192 positions"),
    (["--model", "no-such-model"], "unknown model"),
    (["--docs", "1", "--seq-len", "1024", "--batch-size", "64"], "fewer than one global batch"),
    (["--docs", "1", "--seq-len", "8192"], "no training document of paul_graham is 8192 tokens long"),
    (["--steps", "100000"], "would cycle"),
    (["--corpora", "no_such_corpus"], "unknown corpus"),
    (["--policy", "ntp"], "set w-kl, w-answer and w-anchor to 0"),
    (["--planted-frac", "1"], "planted-frac must be in [0, 1)"),
    (["--planted-frac", "0.25"], "conversations need a prefix of at least 192 tokens"),
    (["--teacher", "peer"], "teacher must be base or self"),
    (["--train-params", "mlp"], "train-params must be all or attention"),
])
def test_bad_input_fails_before_compute(cli, tmp_path, args, message):
    res = cli(*BASE_ARGS, "--out", str(tmp_path / "o"), *args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output


def test_output_folder_of_another_run_is_refused(cli, tmp_path):
    other = TrainConfig(**{**TINY, "policy": "attn"})
    out = tmp_path / "o"
    out.mkdir()
    (out / META_FILE).write_text(json.dumps({"run_key": other.run_key(), "config": other.to_dict()}))
    res = cli(*BASE_ARGS, "--policy", "router", "--out", str(out))
    assert res.exit_code == 2 and "holds another run" in " ".join(res.output.split()), res.output
    stranger = tmp_path / "s"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    res = cli(*BASE_ARGS, "--out", str(stranger))
    assert res.exit_code == 2 and "not a kvcat training folder" in " ".join(res.output.split()), res.output


def test_config_rejects_empty_prefix_or_continuation():
    with pytest.raises(TrainConfigError, match="prefix-frac"):
        TrainConfig(**{**TINY, "prefix_frac": 0.999}).validate()


def test_sequences_stay_inside_one_document_and_conversations_are_mixed_in():
    """Document blocks never cross documents; `planted_frac` of the sequences are training conversations, whose
    answers are marked and whose padding no loss reads."""
    from transformers import AutoTokenizer

    from kvcat.models import resolve
    from kvcat.training.data import build_sequences, document_blocks

    assert document_blocks([[1] * 10, [2] * 7, [3] * 3], 4) == [[1] * 4, [1] * 4, [2] * 4]
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m")[1])
    seqs, info = build_sequences(tok, ("paul_graham",), 256, 0, max_docs=3, planted_frac=0.25, prefix_len=192,
                                 log=lambda m: None)
    assert info["packing"] == "within documents" and info["planted_sequences"] == round(
        info["document_sequences"] / 3) and len(seqs) == info["sequences"]
    n_doc = info["document_sequences"]
    assert bool(seqs.scored[:n_doc].all()) and not bool(seqs.answer[:n_doc].any())
    assert bool(seqs.answer[n_doc:].any(dim=1).all()) and not bool(seqs.answer[:, :192].any())
    assert not bool((seqs.answer & ~seqs.scored).any())


def test_the_base_teacher_is_the_frozen_base_and_only_the_chosen_weights_train():
    """At the first step the trained model is the base: the anchor is zero and the base teacher's KL equals the
    self teacher's. After a step, frozen embeddings and (attention-only) the MLPs are still the base's."""
    first = {}
    for teacher in ("base", "self"):
        trainer = tiny_trainer(policy="attn", retention=0.5, teacher=teacher, base_dtype="fp32",
                               train_params="attention")
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        row = trainer.train_step()
        first[teacher] = row
        after = dict(trainer.model.named_parameters())
        moved = {n for n in before if not torch.equal(before[n], after[n])}
        assert moved and all(".self_attn." in n for n in moved), sorted(moved)[:4]
        assert all(torch.equal(before[n], after[n]) for n in before if "embed_tokens" in n)
    assert first["base"]["anchor"] == pytest.approx(0.0, abs=1e-6)
    assert first["base"]["kl"] == pytest.approx(first["self"]["kl"], rel=1e-4)


def test_the_served_policy_keeps_sinks_recent_and_the_most_surprising_sentence():
    """The `served` mask: every head keeps the same number of slots, among them the first 4 and last 16 prefix
    tokens and the sentence the full pass found most surprising (spans as the served default ranks them)."""
    from kvcat.compaction import spans
    from kvcat.training.policies import SlotBatch

    trainer = tiny_trainer(policy="served", retention=0.5, seq_len=128)
    batch = trainer.data.batch([0, 1])
    p = trainer.cfg.prefix_len
    with torch.no_grad():
        full, _, _ = trainer.forward_pair(batch, [0, 1])
        trainer.policy.begin(SlotBatch(p, [0, 1], 0, batch.ids))
        trainer.model(input_ids=batch.ids, kvcat_observer=trainer.policy.observe)
        trainer.policy.see_logits(full)
        bias = trainer.policy.slot_bias()
    kept = [torch.isfinite(b) for b in bias]
    assert all(int(k.sum(-1).min()) == int(k.sum(-1).max()) == p // 2 for k in kept)
    for k in kept:
        assert bool(k[..., :4].all()) and bool(k[..., p - 16:].all())
    ids = batch.ids[0, :p].tolist()
    logp = torch.log_softmax(full[0, :p - 1].float(), -1)
    nll = torch.cat([torch.zeros(1), -logp.gather(-1, batch.ids[0, 1:p, None]).squeeze(-1)])
    units = spans.units(ids, trainer.tokenizer, 32)
    top = spans.fact_spans(nll, units, 1)  # the peak of the most surprising sentence
    assert all(bool(k[0, :, top].all()) for k in kept)


def test_a_deadline_stops_at_the_next_checkpoint_and_the_same_run_resumes(tmp_path):
    """`Trainer.run(deadline=...)` (kvcat bench kvcat --stop-after) stops at the first save past the deadline; the
    same configuration on the same folder resumes and finishes."""
    import time

    trainer = tiny_trainer(tmp_path / "o", policy="attn", retention=0.5, steps=4, save_every=2)
    trainer.run(deadline=time.time() - 1)
    assert trainer.step == 2
    again = tiny_trainer(tmp_path / "o", policy="attn", retention=0.5, steps=4, save_every=2)
    assert again.step == 2
    again.run()
    assert again.step == 4 and [r["step"] for r in again.history] == [1, 2, 3, 4]
