"""The LoRA stage: supervised fine-tuning of a peft LoRA adapter with trl's SFTTrainer."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from objectives.measure import FIXED_PROMPTS, DeviceClock, measure_decode_latency, peak_memory_mb
from trainer.assignment import Assignment, TrialResult
from trainer.rungs import Reporter, RungCallback
from trainer.tasks import answer_of, load_sft_dataset
from trainer.tiny_model import default_cache_dir, ensure_model

__all__ = ["run_lora", "DEFAULTS"]

DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": "all-linear",
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "lr_scheduler_type": "linear",
    "max_length": 64,
}


def _exact_match(model: Any, tokenizer: Any, eval_rows: Any, limit: int = 16) -> float | None:
    import torch

    rows = [r for r in eval_rows.select(range(min(limit, len(eval_rows))))]
    if not rows or answer_of(rows[0]["completion"]) is None:
        return None
    model.eval()
    hits = 0
    with torch.inference_mode():
        for row in rows:
            enc = tokenizer(row["prompt"], return_tensors="pt").to(model.device)
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += answer_of(text) == answer_of(row["completion"])
    return hits / len(rows)


def run_lora(a: Assignment, reporter: Reporter) -> TrialResult:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    # The launcher's WORLD_SIZE: the process group only exists once the Trainer is built.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    clock = DeviceClock(devices=max(1, world))
    with clock:
        cfg = {**DEFAULTS, **a.runner.get("training", {}), **a.params}
        cache = Path(a.runner["cache_dir"]) if "cache_dir" in a.runner else default_cache_dir()
        model_path = ensure_model(a.runner["model"], cache)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path)
        train, evals = load_sft_dataset(a.runner.get("data", {"synthetic": "arithmetic"}), a.seed)
        targets = str(cfg["lora_target_modules"])
        lora = LoraConfig(
            r=int(cfg["lora_r"]),
            lora_alpha=int(cfg["lora_alpha"]),
            lora_dropout=float(cfg["lora_dropout"]),
            target_modules=targets if targets == "all-linear" else targets.split(","),
            task_type="CAUSAL_LM",
        )
        args = SFTConfig(
            output_dir=a.output_dir,
            max_steps=a.rung_steps[-1],
            learning_rate=float(cfg["learning_rate"]),
            per_device_train_batch_size=int(cfg["per_device_train_batch_size"]),
            per_device_eval_batch_size=int(cfg["per_device_eval_batch_size"]),
            gradient_accumulation_steps=int(cfg["gradient_accumulation_steps"]),
            warmup_steps=float(cfg["warmup_ratio"]),  # a float < 1 is a ratio in transformers 5
            weight_decay=float(cfg["weight_decay"]),
            lr_scheduler_type=str(cfg["lr_scheduler_type"]),
            max_length=int(cfg["max_length"]),
            eval_strategy="no",  # the rung callback asks for evaluations
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=a.seed,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
        )
        callback = RungCallback(
            a.rung_steps,
            reporter,
            extra=lambda: {
                "peak_memory_mb": peak_memory_mb(),
                "device_seconds": clock.seconds * clock.devices,
            },
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evals,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[callback],
        )
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        if callback.stopped:
            return TrialResult("stopped", rungs=callback.rungs, reason=callback.reason)
        final = dict(callback.rungs[-1]["metrics"]) if callback.rungs else {}
        if not trainer.is_world_process_zero():
            return TrialResult("complete", metrics=final, rungs=callback.rungs)
        net: Any = trainer.model
        em = _exact_match(net, tokenizer, evals)
        if em is not None:
            final["exact_match"] = em
        latency = measure_decode_latency(net, tokenizer, FIXED_PROMPTS, max_new_tokens=8)
        final["decode_latency_ms"] = latency.ms_per_token
        final["ttft_ms"] = latency.ttft_ms
        tokens = a.rung_steps[-1] * int(cfg["per_device_train_batch_size"]) * world
        tokens *= int(cfg["max_length"])  # an upper bound: sequences are padded per batch
        final["tokens_per_second"] = tokens / train_seconds if train_seconds > 0 else 0.0
    final["peak_memory_mb"] = peak_memory_mb()
    final["wall_seconds"] = clock.seconds
    final["device_seconds"] = clock.device_seconds
    final = {k: v for k, v in final.items() if math.isfinite(v) or k == "eval_loss"}
    return TrialResult("complete", metrics=final, rungs=callback.rungs)
