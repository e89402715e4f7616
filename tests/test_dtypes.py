"""`--dtype auto`: the engine computes in bf16 only where the hardware has it natively, compaction in float32."""

from __future__ import annotations

import pytest
import torch

from kvcat.config import choose_dtype

CPU = torch.device("cpu")
AVX2 = {"avx2", "fma"}  # a cloud AMD EPYC without AVX-512: vLLM's bf16 is emulated there


@pytest.mark.parametrize("flags, expected, why", [
    (AVX2, "float32", "emulated"), (AVX2 | {"avx512f"}, "float32", "emulated"),
    (AVX2 | {"avx512f", "avx512_bf16"}, "float32", "1.2x"),  # measured: not worth bf16's precision
    (AVX2 | {"amx_bf16", "avx512_bf16"}, "bfloat16", "natively")])
def test_auto_gives_the_engine_bf16_only_where_it_is_several_times_faster(flags, expected, why):
    choice = choose_dtype("auto", "engine", CPU, flags)
    assert (choice.dtype, choice.requested, choice.slow) == (expected, "auto", False)
    assert why in choice.reason


def test_auto_compaction_is_float32_everywhere():
    for flags in (AVX2, AVX2 | {"amx_bf16"}):
        assert choose_dtype("auto", "compaction", CPU, flags).dtype == "float32"
    assert choose_dtype("auto", "engine", torch.device("cuda"), set()).dtype == "bfloat16"


def test_an_explicit_dtype_wins_and_the_slow_one_is_marked():
    slow = choose_dtype("bf16", "engine", CPU, AVX2)
    assert (slow.dtype, slow.slow) == ("bfloat16", True) and "slower" in slow.reason
    assert not choose_dtype("bfloat16", "engine", CPU, AVX2 | {"amx_bf16"}).slow
    assert not choose_dtype("bfloat16", "engine", CPU, AVX2 | {"avx512_bf16"}).slow
    assert choose_dtype("float32", "compaction", CPU, AVX2 | {"amx_bf16"}).dtype == "float32"


@pytest.mark.parametrize("name, words", [("float8", "unknown dtype"), ("", "unknown dtype"),
                                         ("float16", "cannot run on a CPU")])
def test_bad_dtypes_are_refused_with_the_choices(name, words):
    with pytest.raises(ValueError, match=words) as err:
        choose_dtype(name, "engine", CPU, AVX2)
    assert "float32" in str(err.value)


@pytest.mark.parametrize("flag, value, words", [("--dtype", "float8", "unknown dtype 'float8'"),
                                                ("--dtype", "float16", "cannot run on a CPU"),
                                                ("--compaction-dtype", "fp16", "cannot run on a CPU")])
def test_serve_refuses_a_bad_dtype_before_starting_anything(tmp_path, flag, value, words):
    """The CLI names the flag and fails at once: no engine, no store folder."""
    from typer.testing import CliRunner

    from kvcat import cli

    cli._register_packages()
    store = tmp_path / "store"
    res = CliRunner().invoke(cli.app, ["serve", "-m", "smollm2-135m", flag, value, "--store", str(store)])
    assert res.exit_code != 0 and f"{flag}: " in res.output and words in res.output
    assert not store.exists()
