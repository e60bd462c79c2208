"""The pretraining-proxy stage: a causal LM trained from scratch (random init).

The proxy's width (``hidden_size``) and depth (``num_layers``) are searchable; its
architecture otherwise follows ``runner.model`` (the tiny model's config, or a real
model's config with its tokenizer). Quality: eval loss on held-out text (perplexity too).
In evaluation mode (``runner.evaluate``) ``runner.model`` is a trained proxy, loaded as it
is and scored on the named split without training.
"""

from __future__ import annotations

from typing import Any

from stagetune.contract.training import PretrainProxyTraining
from stagetune.trainer.assignment import Assignment, TrialResult
from stagetune.trainer.rungs import Reporter
from stagetune.trainer.splits import Split
from stagetune.trainer.stages.common import Trial, trainer_quality

__all__ = ["run_pretrain_proxy", "proxy_config"]


def proxy_config(base: Any, settings: PretrainProxyTraining) -> Any:
    """The base config with the trial's width and depth (heads keep ``head_dim``); an unset
    width or depth is the base model's."""
    hidden = settings.hidden_size if settings.hidden_size is not None else base.hidden_size
    head_dim = settings.head_dim
    if hidden % head_dim:
        raise ValueError(f"hidden_size: {hidden} is not a multiple of head_dim {head_dim}")
    config = base.__class__.from_dict(base.to_dict())
    config.hidden_size = hidden
    if settings.num_layers is not None:
        config.num_hidden_layers = settings.num_layers
    config.num_attention_heads = hidden // head_dim
    config.num_key_value_heads = hidden // head_dim
    if hasattr(config, "head_dim"):
        config.head_dim = head_dim
    config.intermediate_size = int(round(hidden * settings.mlp_ratio))
    return config


def run_pretrain_proxy(a: Assignment, reporter: Reporter) -> TrialResult:
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    with Trial(a, reporter, PretrainProxyTraining) as t:
        data = t.data()
        path = t.model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if t.evaluating:
            model = AutoModelForCausalLM.from_pretrained(path)
        else:
            config = proxy_config(AutoConfig.from_pretrained(path), t.settings)
            torch.manual_seed(a.seed)
            model = AutoModelForCausalLM.from_config(config)
        max_length = t.settings.max_length

        def tokenize(batch: dict[str, list[str]]) -> Any:
            return tokenizer(
                [text + tokenizer.eos_token for text in batch["text"]],
                truncation=True,
                max_length=max_length,
            )

        def tokenized(split: Split) -> Any:
            rows = data.dataset(split)
            return rows.map(tokenize, batched=True, remove_columns=rows.column_names)

        held_out = tokenized(data.held_out)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**t.training_args()),
            train_dataset=None if t.evaluating else tokenized("train"),
            eval_dataset=held_out,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            processing_class=tokenizer,
            callbacks=[t.rung_callback()],
        )

        def size(net: Any) -> dict[str, float | None]:
            return {"parameters_m": net.num_parameters() / 1e6}

        if t.evaluating:
            return t.evaluate(
                model,
                tokenizer,
                lambda: {**trainer_quality(trainer, {"eval_loss": "eval_loss"}), **size(model)},
            )
        return t.train(trainer, tokenizer, quality=size)
