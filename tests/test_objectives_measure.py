"""Measurement helpers on real processes and a tiny real model (CPU; no GPU needed)."""

from __future__ import annotations

import json
import string
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from stagetune.objectives.measure import (
    FIXED_PROMPTS,
    DeviceClock,
    measure_decode_latency,
    peak_memory_mb,
    reset_peak_memory,
)

ROOT = Path(__file__).resolve().parents[1]


def test_fixed_prompts_are_five_short_ascii_prompts() -> None:
    assert len(FIXED_PROMPTS) == 5
    assert all(p.isascii() and 0 < len(p) <= 40 for p in FIXED_PROMPTS)


def test_cpu_peak_memory_is_positive_and_grows_with_a_400_mb_buffer() -> None:
    # A fresh process: the peak RSS of this test process may already exceed what a new
    # 200 MB buffer would reach, since the peak can only be read for a whole process.
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        from stagetune.objectives.measure import peak_memory_mb, reset_peak_memory
        before = peak_memory_mb()
        reset_peak_memory()  # a no-op on CPU: the peak cannot be lowered
        buffer = np.ones(400 * 2**20 // 8)  # 400 MiB, every page written
        after = peak_memory_mb("cpu")
        print(json.dumps({"before": before, "after": after, "torch": "torch" in sys.modules}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,  # `-c` puts the working directory first on sys.path
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(result.stdout)
    assert measured["before"] > 0
    # Less than the full 400: part of the buffer reuses pages freed since the earlier peak.
    assert measured["after"] - measured["before"] >= 250
    assert measured["torch"] is False  # measuring CPU memory never imports torch


def test_cpu_peak_memory_is_at_least_the_current_rss_and_survives_a_reset() -> None:
    import psutil

    rss = psutil.Process().memory_info().rss / 2**20  # read first: the peak only grows
    peak = peak_memory_mb("cpu")
    assert peak >= rss - 1  # rounding to KiB
    reset_peak_memory("cpu")
    assert peak_memory_mb("cpu") >= peak


def test_device_clock_multiplies_wall_time_by_devices() -> None:
    with DeviceClock(devices=4) as clock:
        time.sleep(0.05)
        assert clock.seconds > 0  # readable while the block runs
    assert clock.seconds >= 0.05
    assert clock.device_seconds == pytest.approx(4 * clock.seconds)
    frozen = clock.device_seconds
    time.sleep(0.01)
    assert clock.device_seconds == frozen  # stops when the block ends


def test_device_clock_needs_at_least_one_device() -> None:
    assert DeviceClock().device_seconds == 0.0
    with pytest.raises(ValueError, match="devices"):
        DeviceClock(devices=0)


# --- decode latency on a tiny Llama built in code --------------------------------------

EOS, PAD, UNK = 0, 1, 2


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[Any, Any]:
    """A random 2-layer Llama (hidden 32) and a character-level tokenizer, ~45 tokens."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set("".join(FIXED_PROMPTS) + string.digits + string.ascii_lowercase))
    vocab = {"<eos>": EOS, "<pad>": PAD, "<unk>": UNK} | {c: i + 3 for i, c in enumerate(chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def test_decode_latency_counts_every_requested_token(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    model.train()
    latency = measure_decode_latency(model, tokenizer, FIXED_PROMPTS, max_new_tokens=8)
    assert latency.ms_per_token > 0
    assert latency.ttft_ms > 0
    assert latency.tokens == 8 * len(FIXED_PROMPTS)
    assert model.training  # train mode restored


def test_decode_latency_with_one_token_and_an_eval_model(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    model.eval()
    latency = measure_decode_latency(model, tokenizer, FIXED_PROMPTS[:2], max_new_tokens=1)
    assert latency.tokens == 2
    assert latency.ms_per_token > 0
    assert not model.training  # eval mode kept


def test_decode_latency_decodes_past_an_immediate_eos(tiny_lm: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = tiny_lm
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.norm.weight.zero_()  # all logits 0: greedy picks token 0, the EOS
    try:
        ids = tokenizer(FIXED_PROMPTS[0], return_tensors="pt")["input_ids"]
        plain = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert plain.shape[1] == ids.shape[1] + 1  # stops at EOS on its own
        latency = measure_decode_latency(model, tokenizer, FIXED_PROMPTS, max_new_tokens=6)
        assert latency.tokens == 6 * len(FIXED_PROMPTS)
    finally:
        model.load_state_dict(state)


def test_decode_latency_rejects_bad_arguments(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="prompts"):
        measure_decode_latency(model, tokenizer, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        measure_decode_latency(model, tokenizer, FIXED_PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="warmup"):
        measure_decode_latency(model, tokenizer, FIXED_PROMPTS, warmup=-1)
    with pytest.raises(ValueError, match="repeats"):
        measure_decode_latency(model, tokenizer, FIXED_PROMPTS, repeats=0)
