"""Tiny causal LMs and tokenizers built in code, saved, then loaded with ``from_pretrained``.

No network: the demo and the tests build a small Llama-style model and a character-level
tokenizer here and save them to a folder, so the real loading path is what runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["build_tiny_model", "ensure_model", "default_cache_dir"]

_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
_TINY_DEFAULTS = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}


def default_cache_dir() -> Path:
    return Path(os.environ.get("STAGETUNE_CACHE", Path.home() / ".cache" / "stagetune"))


def _tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=1024,
    )


def build_tiny_model(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """Build (once) a seeded tiny LlamaForCausalLM + char tokenizer in ``out_dir``.

    Safe when several workers build the same folder at once: each builds into a temporary
    folder and renames it into place; the first rename wins.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_model(model_cfg: dict[str, Any], cache_dir: Path | None = None) -> str:
    """What ``from_pretrained`` should load for ``runner.model``: a path or hub id as given,
    or a tiny model built (once) in the cache from its ``tiny`` settings."""
    if ("name_or_path" in model_cfg) == ("tiny" in model_cfg):
        raise ValueError("runner.model: needs exactly one of name_or_path or tiny")
    if "name_or_path" in model_cfg:
        return str(model_cfg["name_or_path"])
    settings = {**_TINY_DEFAULTS, **model_cfg["tiny"]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = (cache_dir or default_cache_dir()) / f"tiny-llama-{key}"
    return str(build_tiny_model(path, **settings))
