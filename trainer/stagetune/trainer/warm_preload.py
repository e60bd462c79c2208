"""What the warm trial host imports once (``stagetune.trainer.warm_host``): the training
stack and every built-in stage runner, so a trial forked from the host starts with them in
memory instead of importing them again (several seconds a trial on a CPU).

Importing does not start CUDA or torch's thread pools, so forking after it is safe; a trial
sets its own thread count and sees only its own GPUs (both read when first used).
"""

from __future__ import annotations

import contextlib
import gc
import importlib

import accelerate  # noqa: F401
import datasets  # noqa: F401
import peft  # noqa: F401
import torch
import transformers  # noqa: F401
import trl  # noqa: F401

from stagetune.contract.stages import STAGES
from stagetune.trainer import custom_trial, run_trial  # noqa: F401
from stagetune.trainer.stages import common  # noqa: F401

for _stage in STAGES.values():
    importlib.import_module(_stage.runner.partition(":")[0])

# The libraries load most of themselves lazily, on first attribute access: touch what the
# runners use so the fork inherits it too.
for _module, _names in {
    "transformers": (
        "AutoModelForCausalLM",
        "AutoTokenizer",
        "LlamaConfig",
        "LlamaForCausalLM",
        "PreTrainedTokenizerFast",
        "Trainer",
        "TrainingArguments",
        "set_seed",
    ),
    "trl": ("SFTConfig", "SFTTrainer", "DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer"),
    "peft": ("LoraConfig", "get_peft_model", "AutoPeftModelForCausalLM"),
}.items():
    for _name in _names:
        getattr(importlib.import_module(_module), _name)

# First-use work that each fork would otherwise redo (measured on the tiny model: about
# 0.4 s of a 0.7 s warm start): transformers' table of checkpoint conversions (built on
# the first from_pretrained, ~1,000 regular expressions compiled) and DeepSpeed, which
# accelerate imports whenever it is installed (``extract_model_from_parallel``). DeepSpeed
# probes the accelerator on import: it is preloaded only where torch was built without a
# GPU backend, so nothing in the host can have touched CUDA before it forks.
try:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
except ImportError:  # an internal of transformers: skipped where it is gone
    pass
else:
    get_checkpoint_conversion_mapping("llama")
if torch.version.cuda is None and torch.version.hip is None:
    with contextlib.suppress(ImportError):
        import deepspeed  # noqa: F401

# What was imported is never collected: keep it out of every trial's garbage collections
# (a full collection at the end of training walks the whole heap otherwise), and keep the
# collector from writing to the pages each fork shares with the host.
gc.freeze()
