"""A plain Hugging Face ``Trainer`` fine-tune, tuned by stagetune: bringing your own training code.

Three things here are stagetune's: ``current_trial()`` (the leased params, the same on every
rank, and the budget in steps), the values the study sets (``trial.settings``), and
``StagetuneCallback`` (evaluates at the rung steps, reports, stops when told, completes).
The rest is an ordinary training script. Run it as a study's trials:

    stagetune worker --allow-script finetune=tests/examples/hf_trainer_finetune.py
    stagetune submit tests/examples/finetune.yaml      # runner.script: finetune

Values it reads from the study (``runner.training`` or the search space), each optional:
``model_name_or_path``, ``learning_rate``, ``adam_beta2``, ``weight_decay``,
``warmup_ratio``, ``per_device_train_batch_size``. Without a model it builds a tiny one in
code and saves it first, so it runs offline and loads it the way it would load yours.
"""

from __future__ import annotations

import json
import random

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from stagetune.integrations.transformers import StagetuneCallback
from stagetune.sdk import current_trial


def arithmetic(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 49), rng.randint(0, 49)) for _ in range(n)]
    return [f"{a}+{b}={a + b}" for a, b in pairs]


def main() -> None:
    trial = current_trial()
    settings = trial.settings
    # What this rank was given: every rank reads the same assignment, so the same params.
    params = json.dumps(dict(trial.params), sort_keys=True)
    print(f"finetune: rank {trial.rank} trial {trial.trial_id} params {params}", flush=True)

    model_path = settings.get("model_name_or_path")
    if not model_path:
        from stagetune.trainer.tiny_model import build_tiny_model

        model_path = str(build_tiny_model(trial.output_dir / "base", hidden_size=32, num_layers=1))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)

    def encode(texts: list[str]) -> Dataset:
        rows = Dataset.from_dict({"text": texts})
        return rows.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=24),
            batched=True,
            remove_columns=["text"],
        )

    args = TrainingArguments(
        output_dir=str(trial.output_dir),
        max_steps=trial.max_steps,
        learning_rate=float(settings.get("learning_rate", 1e-3)),
        adam_beta2=float(settings.get("adam_beta2", 0.999)),
        weight_decay=float(settings.get("weight_decay", 0.0)),
        warmup_steps=float(settings.get("warmup_ratio", 0.0)),  # a float < 1 is a ratio
        per_device_train_batch_size=int(settings.get("per_device_train_batch_size", 8)),
        per_device_eval_batch_size=16,
        eval_strategy="no",  # the callback evaluates at the rung steps
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=trial.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encode(arithmetic(256, seed=0)),
        eval_dataset=encode(arithmetic(32, seed=1)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[StagetuneCallback(trial)],
    )
    trainer.train()


if __name__ == "__main__":
    main()
