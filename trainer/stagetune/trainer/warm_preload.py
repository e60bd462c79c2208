"""What the warm trial host imports once (``stagetune.trainer.warm_host``): the training
stack and every built-in stage runner, so a trial forked from the host starts with them in
memory instead of importing them again (several seconds a trial on a CPU).

Importing does not start CUDA or torch's thread pools, so forking after it is safe; a trial
sets its own thread count and sees only its own GPUs (both read when first used).
"""

from __future__ import annotations

import gc
import importlib

import accelerate  # noqa: F401
import datasets  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import trl  # noqa: F401

from stagetune.contract.stages import STAGES
from stagetune.trainer import custom_trial, run_trial  # noqa: F401
from stagetune.trainer.stages import common  # noqa: F401

for _stage in STAGES.values():
    importlib.import_module(_stage.runner.partition(":")[0])

# The libraries load most of themselves lazily, on first attribute access: touch what the
# runners use so the fork inherits it too. DeepSpeed is left out: importing it probes CUDA,
# and a process that has touched CUDA must not fork.
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

# What was imported is never collected: keep it out of every trial's garbage collections
# (a full collection at the end of training walks the whole heap otherwise), and keep the
# collector from writing to the pages each fork shares with the host.
gc.freeze()
