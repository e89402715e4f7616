"""The KV connector without an engine, in the manner of vLLM's own connector unit tests: the transfer params
round trip through vLLM's SamplingParams and Request, the scheduler side's claims and metadata, and the worker
side's slot writes (through the CPU backend's own op) and hand-over of the step's beta map."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from kvcat.server.engine_api import ContextTransfer, SamplingParams, TransferParamsError  # noqa: E402

BLOCK, HEADS, DIM, LAYERS = 32, 2, 32, 2
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def _transfer(path="/store/ctx-1.kvc", slots=40, tokens=160) -> ContextTransfer:
    return ContextTransfer("ctx-1", str(path), slots, tokens, "kvcat:ctx-1:v1:beta")


def _config(beta: bool = True, static_forward_context: dict | None = None):
    """The parts of a VllmConfig the connector reads."""
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"beta": beta}),
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
        model_config=SimpleNamespace(dtype=torch.float32, get_total_num_kv_heads=lambda: HEADS,
                                     hf_config=SimpleNamespace(head_dim=DIM, hidden_size=4 * DIM,
                                                               num_attention_heads=4, rope_theta=10000.0)),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        compilation_config=SimpleNamespace(static_forward_context=static_forward_context or {}))


def _request(request_id: str, transfer: ContextTransfer | None):
    """vLLM's own Request, made from the SamplingParams the engine adapter builds."""
    from vllm.v1.request import Request

    from kvcat.server.vllm_adapter.engine import vllm_sampling_params

    params = vllm_sampling_params(SamplingParams(max_tokens=4), transfer)
    return Request(request_id, [0] * ((transfer.num_slots if transfer else 0) + 3), params, None)


def test_transfer_params_round_trip_and_refusals():
    from kvcat.server.vllm_adapter.connector import transfer_of

    transfer = _transfer()
    assert ContextTransfer.from_dict(transfer.to_dict()) == transfer and transfer.shift == 120
    assert transfer_of(_request("r1", transfer)) == transfer
    assert transfer_of(_request("plain", None)) is None
    for bad, match in [({**transfer.to_dict(), "num_slots": "40"}, "not int"),
                       ({k: v for k, v in transfer.to_dict().items() if k != "salt"}, r"lacks \['salt'\]"),
                       ({**transfer.to_dict(), "key": "old name"}, r"unknown \['key'\]"),
                       ({**transfer.to_dict(), "num_slots": 200}, "cannot fill"),
                       (["ctx-1"], "not a dict")]:
        with pytest.raises(TransferParamsError, match=match):
            ContextTransfer.from_dict(bad)


def test_sampling_params_reach_vllm_field_by_field():
    from kvcat.server.vllm_adapter.engine import vllm_sampling_params

    ours = SamplingParams(max_tokens=7, min_tokens=2, n=2, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1,
                          presence_penalty=0.3, frequency_penalty=-0.2, repetition_penalty=1.1, logit_bias={3: 1.5},
                          seed=11, stop=["x"], stop_token_ids=[2], ignore_eos=True, logprobs=3,
                          structured={"json_object": True}, cache_salt="tenant")
    theirs = vllm_sampling_params(ours, None)
    assert {name: getattr(theirs, name) for name in ours.engine_fields()} == ours.engine_fields()
    assert theirs.structured_outputs.json_object is True and theirs.extra_args is None


def test_scheduler_side_claims_the_slots_and_builds_the_metadata():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvcat.server.vllm_adapter.connector import KvcatConnector, KvcatConnectorMetadata, SlotLoad

    connector = KvcatConnector(_config(), KVConnectorRole.SCHEDULER)
    transfer, blocks = _transfer(), SimpleNamespace(get_block_ids=lambda: ([5, 2, 9],))
    request, plain = _request("r1", transfer), _request("plain", None)
    assert connector.get_num_new_matched_tokens(plain, 0) == (0, False)
    assert connector.get_num_new_matched_tokens(request, 0) == (40, False)
    assert connector.get_num_new_matched_tokens(request, 32) == (8, False)  # a block hit vLLM's prefix cache
    connector.update_state_after_alloc(plain, blocks, 0)
    connector.update_state_after_alloc(request, blocks, 8)
    meta = connector.build_connector_meta(None)
    assert meta == KvcatConnectorMetadata(loads={"r1": SlotLoad(transfer, [5, 2, 9], 32, 40)}, beta={5: transfer})
    assert pickle.loads(pickle.dumps(meta)) == meta  # it crosses to the worker processes
    assert connector.build_connector_meta(None) == KvcatConnectorMetadata(beta={5: transfer})  # decode steps
    connector.request_finished(request, [5, 2, 9])
    assert connector.build_connector_meta(None) == KvcatConnectorMetadata()
    stock = KvcatConnector(_config(beta=False), KVConnectorRole.SCHEDULER)
    stock.update_state_after_alloc(request, blocks, 40)
    assert stock.build_connector_meta(None).beta == {}


def _cpu_layer():
    """An attention layer whose impl is vLLM's CPU impl (its do_kv_cache_update and the compiled op)."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    impl = object.__new__(CPUAttentionBackendImpl)
    impl.__dict__.update(attn_type=AttentionType.DECODER, kv_cache_dtype="auto")
    layer = SimpleNamespace(impl=impl, isa=_get_attn_isa(torch.float32, BLOCK, DIM, "auto"))  # as vLLM sets it
    layer.__dict__.update({"_k_scale_float": 1.0, "_v_scale_float": 1.0})  # what vLLM's quant setup writes
    return layer


def test_worker_side_writes_the_slots_and_hands_the_beta_map_over(tmp_path, monkeypatch):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvcat.cache import CompactCache
    from kvcat.server.vllm_adapter import connector as module
    from kvcat.server.vllm_adapter.worker_contexts import WorkerContexts

    worker = WorkerContexts()
    monkeypatch.setattr(module, "WORKER", worker)
    gen = torch.Generator().manual_seed(0)
    t = 20
    cache = CompactCache(keys=[torch.randn(HEADS, t, DIM, generator=gen) for _ in range(LAYERS)],
                         values=[torch.randn(HEADS, t, DIM, generator=gen) for _ in range(LAYERS)],
                         beta=[torch.randn(HEADS, t, generator=gen) for _ in range(LAYERS)],
                         num_tokens=t, model_fingerprint="test", method="test")
    transfer = _transfer(cache.save(tmp_path / "ctx.kvc"), slots=t, tokens=t)
    kv_caches = {name: torch.zeros(6, HEADS, BLOCK, 2 * DIM) for name in NAMES}
    connector = module.KvcatConnector(_config(static_forward_context={n: _cpu_layer() for n in NAMES}),
                                      KVConnectorRole.WORKER)
    connector.register_kv_caches(kv_caches)  # calibrates the layout and runs its self-test through the op
    assert worker.layout is connector.layout

    table = [4, 1, 3]
    missing = module.SlotLoad(_transfer(tmp_path / "gone.kvc", slots=t, tokens=t), [0, 5], 0, t)
    meta = module.KvcatConnectorMetadata(loads={"r1": module.SlotLoad(transfer, table, 4, t), "r2": missing},
                                         beta={4: transfer})
    connector.bind_connector_metadata(meta)
    assert worker.beta is meta.beta  # what the attention layers read during this step's forward
    connector.start_load_kv(None)
    loaded = worker.get(transfer)
    for name, kv in kv_caches.items():
        k, v = connector.layout.gather(kv, torch.tensor(table), t)
        layer = NAMES.index(name)
        assert torch.equal(k[:, 4:], loaded.keys[layer][:, 4:]) and torch.equal(v[:, 4:], loaded.values[layer][:, 4:])
        assert not k[:, :4].any(), "slots of the local prefix-cache hit were written again"
        assert torch.allclose(loaded.keys[layer], cache.keys[layer], atol=1e-5)  # shift 0: keys as stored
    assert connector.get_block_ids_with_load_errors() == {0}  # the unreadable context's slots' block only
    connector.clear_connector_metadata()
    assert worker.beta == {} and connector.step is None
