"""The reference inference path: identity caches reproduce full-context logits; beta acts as a bias."""

import pytest
import torch

from kvcat.cache import CompactCache
from kvcat.inference import CacheSession, ContextTooLongError, continuation_nll, full_cache, prefill

TEXT = ("The lighthouse keeper counted ships every night. On the ninth night a red ship arrived, "
        "and the keeper wrote its name, Aurora, in the logbook before sunrise. ") * 12


def _ids(lm, n):
    ids = lm.tokenizer(TEXT)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.parametrize("chunk", [64, 4096])
def test_identity_cache_reproduces_full_logits(small, chunk):
    ids = _ids(small, 200)
    prefix, cont = ids[:150], ids[150:]
    small.model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        ref = small.model(torch.tensor([ids])).logits[0, 150:].float()
    cache = full_cache(prefill(small, prefix, chunk_size=chunk), small.spec.fingerprint)
    got = CacheSession(small, cache).forward(cont)
    assert torch.allclose(got, ref, atol=1e-4, rtol=0)


def test_beta_is_an_additive_logit_bias(tiny):
    """beta = log(2) on a slot must act exactly like that key appearing twice."""
    ids = _ids(tiny, 40)
    pre = prefill(tiny, ids[:30])
    doubled = CompactCache(
        keys=[torch.cat([k, k[:, :1]], 1) for k in pre.keys],
        values=[torch.cat([v, v[:, :1]], 1) for v in pre.values],
        beta=[torch.zeros(k.shape[0], k.shape[1] + 1) for k in pre.keys],
        num_tokens=31, model_fingerprint=tiny.spec.fingerprint, method="test")
    biased = full_cache(pre, tiny.spec.fingerprint)
    for b in biased.beta:
        b[:, 0] = torch.log(torch.tensor(2.0))
    biased.num_tokens = 31  # same positions for the new tokens as in `doubled`
    a = CacheSession(tiny, doubled).forward(ids[30:])
    b = CacheSession(tiny, biased).forward(ids[30:])
    assert torch.allclose(a, b, atol=1e-4)


def test_side_slots_are_attended_like_paged_ones(tiny):
    """A hybrid cache (head 0 of every layer whole: 10 paged slots + 20 side slots, the others 10 slots) gives
    the logits of the same slots all in one padded tensor (the others' 20 beyond masked with -inf)."""
    from kvcat.cache import SideHeads

    ids = _ids(tiny, 40)
    pre = prefill(tiny, ids[:30])
    side = [SideHeads(torch.tensor([0]), k[:1, 10:], v[:1, 10:], torch.zeros(1, 20))
            for k, v in zip(pre.keys, pre.values)]
    hybrid = CompactCache([k[:, :10] for k in pre.keys], [v[:, :10] for v in pre.values],
                          [torch.zeros(k.shape[0], 10) for k in pre.keys], 30, tiny.spec.fingerprint, "test", side=side)
    padded = full_cache(pre, tiny.spec.fingerprint)
    for b in padded.beta:
        b[1:, 10:] = float("-inf")
    assert hybrid.held_slots() < sum(b.numel() for b in padded.beta)
    a = CacheSession(tiny, hybrid).forward(ids[30:])
    b = CacheSession(tiny, padded).forward(ids[30:])
    assert torch.allclose(a, b, atol=1e-5)


def test_no_context_is_worse_than_full_context(smollm2):
    small = smollm2
    ids = _ids(small, 260)
    cache = full_cache(prefill(small, ids[:200]), small.spec.fingerprint)
    assert continuation_nll(small, cache, ids[200:]).mean() < continuation_nll(small, None, ids[200:]).mean()


def test_two_questions_over_one_cache(small):
    ids = _ids(small, 120)
    cache = full_cache(prefill(small, ids), small.spec.fingerprint)
    tok = small.tokenizer
    a = CacheSession(small, cache).generate(tok(" The ship was called")["input_ids"], max_new_tokens=4)
    b = CacheSession(small, cache).generate(tok(" The keeper counted")["input_ids"], max_new_tokens=4)
    assert a and b and cache.num_tokens == 120


def test_context_longer_than_model_is_refused(tiny):
    with pytest.raises(ContextTooLongError, match="8193 tokens.*8192"):
        prefill(tiny, [1] * 8193)


def test_queries_only_pass_matches_a_full_continuation(tiny):
    """keep_new_kv=False (reference queries) gives the same queries as a pass that stores its K/V, leaves
    the past untouched, and query_positions keeps exactly the chosen rows."""
    ids = _ids(tiny, 90)
    pre = prefill(tiny, ids[:60], capture_queries=True)
    before = [k.clone() for k in pre.keys]
    stored = prefill(tiny, ids[60:], capture_queries=True, past=pre)
    peek = prefill(tiny, ids[60:], capture_queries=True, past=pre, keep_new_kv=False)
    assert stored.num_tokens == 90 and peek.num_tokens == 60
    for a, b in zip(stored.queries, peek.queries):
        assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.equal(k, k0) for k, k0 in zip(pre.keys, before))
    rows = torch.tensor([0, 7, 29])
    some = prefill(tiny, ids[60:], capture_queries=True, past=pre, keep_new_kv=False, query_positions=rows)
    for a, b in zip(stored.queries, some.queries):
        assert torch.allclose(a[:, rows], b, atol=1e-5)
    with pytest.raises(ValueError, match="needs a past"):
        prefill(tiny, ids, keep_new_kv=False)
