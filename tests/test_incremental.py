"""Incremental compaction: the new tokens' block is computed over the existing cache at the right positions,
joined blocks form one valid cache that answers questions, and the bad cases are refused."""

import pytest
import torch

from kvcat import data
from kvcat.cache import CacheError
from kvcat.compaction import CompactionError, get_method
from kvcat.compaction.incremental import extend, segment_state
from kvcat.inference import CacheSession, ContextTooLongError, continuation_nll, full_cache, prefill


@pytest.fixture(scope="module")
def ids(small):
    (w,) = data.token_windows(small.tokenizer, 700, 100, n=1, split="heldout")
    return list(w.prefix_ids), list(w.continuation_ids)


def test_new_block_kv_equal_a_prefill_of_the_whole_text(small, ids):
    prefix, _ = ids
    a, b = prefix[:400], prefix[400:]
    whole = prefill(small, prefix)
    state = segment_state(small, full_cache(prefill(small, a), small.spec.fingerprint), torch.tensor(b), "repeat")
    for layer in range(small.spec.num_layers):
        torch.testing.assert_close(state.prefill.keys[layer], whole.keys[layer][:, 400:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.prefill.values[layer], whole.values[layer][:, 400:], atol=1e-4, rtol=1e-4)
    assert state.queries["repeat"][0].shape[1] > 0 and state.num_tokens == len(b)


@pytest.mark.parametrize("name", ["am-hak", "snapkv"])
def test_extended_cache_is_one_valid_cache(small, ids, name):
    prefix, cont = ids
    a, b = prefix[:400], prefix[400:]
    method = get_method(name)
    first = method.compact(small, a, ratio=4)
    joined = extend(small, first, b, method, ratio=4)
    assert joined.num_tokens == len(prefix)
    assert joined.num_slots == first.num_slots + joined.info["blocks"][1]["slots"]
    assert [blk["tokens"] for blk in joined.info["blocks"]] == [400, len(b)]
    joined.validate()
    nll = continuation_nll(small, joined, cont).mean().item()
    none = continuation_nll(small, None, cont).mean().item()
    assert nll < none, (nll, none)  # the joined context still helps the continuation
    tok = small.tokenizer
    out = CacheSession(small, joined).generate(tok("\nIn short, this text is about")["input_ids"], max_new_tokens=4)
    assert out


def test_bad_extensions_are_refused(small, tiny, ids):
    prefix, _ = ids
    method = get_method("am-hak")
    base = method.compact(small, prefix[:400], ratio=4)
    with pytest.raises(CompactionError, match="two new tokens"):
        extend(small, base, prefix[400:401], method, ratio=4)
    with pytest.raises(CompactionError, match="above 1"):
        extend(small, base, prefix[400:], method, ratio=0.5)
    with pytest.raises(ContextTooLongError):
        extend(small, base, [5] * small.spec.max_positions, method, ratio=4)
    with pytest.raises(CacheError, match="made for model"):
        extend(tiny, base, prefix[400:], method, ratio=4)
    with pytest.raises(CompactionError, match="query modes"):
        extend(small, base, prefix[400:], get_method("am-hak", queries="self-study"), ratio=4)
