"""What every stage runner shares: settings, the base model, the Trainer arguments (the
systems knobs included), rung reporting and the final measurements.

Latency, memory and device-seconds are measured here, by ``objectives.measure``, the same
way for every stage; a stage adds only its quality metric.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from stagetune.contract.packaged import packaged_path
from stagetune.contract.spec import ModelSource, RunnerSettings, parse_runner
from stagetune.contract.training import TrainingSettings
from stagetune.objectives.measure import (
    FIXED_PROMPTS,
    DeviceClock,
    measure_decode_latency,
    peak_memory_mb,
)
from stagetune.trainer.assignment import Assignment, TrialResult, process_rank
from stagetune.trainer.rungs import Reporter, RungCallback
from stagetune.trainer.tiny_model import default_cache_dir, ensure_model

__all__ = [
    "Trial",
    "deepspeed_config",
    "greedy_completions",
    "load_model",
    "resolve_model_path",
]

S = TypeVar("S", bound=TrainingSettings)
_URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:", "file:")


def deepspeed_config(training: TrainingSettings) -> str | None:
    """The DeepSpeed JSON for these settings: a config of the team's own, or ZeRO-N."""
    if training.deepspeed_config:
        path = Path(training.deepspeed_config)
        if not path.exists():
            raise ValueError(f"runner.training.deepspeed_config: {path} does not exist")
        return str(path)
    if training.zero_stage == 0:
        return None
    try:
        return str(packaged_path(f"deepspeed/zero{training.zero_stage}.json"))
    except FileNotFoundError as e:
        raise ValueError(f"runner.training.zero_stage: {e}") from None


def resolve_model_path(model: ModelSource, cache: Path) -> str:
    """A local folder ``from_pretrained`` can load for ``runner.model``.

    ``tiny`` builds (once) a tiny model in the cache; an MLflow artifact URI (``runs:/ID/
    model``, ``models:/...``, ``mlflow-artifacts:/...``) is downloaded once into the cache
    from the tracking server in ``MLFLOW_TRACKING_URI``; anything else is a local path or a
    hub id, passed as is.
    """
    name = model.name_or_path
    if name is None or not name.startswith(_URI_SCHEMES):
        return ensure_model(model.as_mapping(), cache)
    import mlflow

    key = hashlib.sha256(name.encode()).hexdigest()[:16]
    target = cache / "artifacts" / key
    done = target / ".complete"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(artifact_uri=name, dst_path=str(target))
        done.write_text(local)
    return done.read_text()


def load_model(path: str, keep_adapter: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a full model folder, or from a LoRA adapter folder.

    An adapter (a folder with ``adapter_config.json``, e.g. a LoRA stage's saved result) is
    either merged into its base (``keep_adapter=False``: SFT and the proxy need no
    reference model) or kept as a trainable PeftModel (``keep_adapter=True``: DPO and GRPO,
    where trl then freezes a copy of the adapter as the reference, so the reference is the
    SFT/LoRA policy and not the bare base; merging in memory would make trl reload the
    bare base from disk as the reference instead).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        if keep_adapter:
            model = AutoPeftModelForCausalLM.from_pretrained(path, is_trainable=True)
        else:
            model = AutoPeftModelForCausalLM.from_pretrained(path).merge_and_unload()
            model.requires_grad_(True)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def greedy_completions(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int
) -> list[str]:
    """The greedy completion of each prompt alone (batch of one, no sampling), in eval
    mode; the model's train/eval mode is restored afterwards."""
    import torch

    completions = []
    was_training = model.training
    model.train(False)
    try:
        with torch.inference_mode():
            for prompt in prompts:
                enc = tokenizer(prompt, return_tensors="pt").to(model.device)
                out = model.generate(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[0, enc["input_ids"].shape[1] :]
                completions.append(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return completions


def _deepspeed_on_cpu() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (C++) on first
    use: minutes on a small machine and a hard failure without a compiler. Plain gloo
    collectives do the same job for CPU trials, so the op is marked unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _whole_model(trainer: Any) -> Any:
    """The trained model with all its weights on rank 0, for decoding and saving.

    Under ZeRO-3 each rank holds a shard: every rank gathers the full state dict (a
    collective), the global ZeRO-3 switch is turned off (so ``generate`` does not wait for
    the other ranks), and rank 0 loads the weights into a plain copy of the model.
    """
    engine = trainer.model_wrapped
    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()
    if stage != 3:
        return trainer.model
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    state = trainer.accelerator.get_state_dict(engine)
    unset_hf_deepspeed_config()
    if not trainer.is_world_process_zero():
        return trainer.model
    model = trainer.model
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        from peft import get_peft_model

        base = model.get_base_model()
        copy = get_peft_model(type(base)(base.config), model.peft_config["default"])
    else:
        copy = type(model)(model.config)
    copy.load_state_dict(state)
    return copy


def _reference(trainer: Any) -> str:
    """What the trainer compares the policy against (DPO, GRPO with beta > 0)."""
    if getattr(trainer, "ref_model", None) is not None:
        return "separate reference model"
    adapters = getattr(trainer.model, "peft_config", None)
    if isinstance(adapters, dict) and "ref" in adapters:
        return "frozen copy of the starting adapter"
    if adapters and hasattr(trainer, "ref_model"):
        return "the policy with its adapter disabled"
    return "none"


class Trial(Generic[S]):
    """One trial of any stage, from model loading to the final measurements.

    ``runner`` is the study's runner section, typed, with the trial's params applied to
    its training settings; ``settings`` is that training part as the stage's own class
    (``settings_type``). Use as a context manager: the device clock runs from entry
    (model loading included) to the final measurement. ``train`` runs a built Trainer
    and returns the TrialResult.
    """

    def __init__(self, a: Assignment, reporter: Reporter, settings_type: type[S]) -> None:
        self.a = a
        self.reporter = reporter
        self.world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's, before init
        self.runner: RunnerSettings = parse_runner(a.stage, a.runner, a.params)
        training = self.runner.training
        if not isinstance(training, settings_type):
            raise TypeError(f"stage {a.stage!r} has no {settings_type.__name__}")
        self.settings: S = training
        cache = self.runner.cache_dir
        self.cache = Path(cache) if cache else default_cache_dir()
        self.clock = DeviceClock(devices=max(1, self.world))
        self.callback: RungCallback | None = None

    def __enter__(self) -> Trial[S]:
        self.clock.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.clock.__exit__(exc_type, exc, tb)

    # ------------------------------------------------------------ building blocks

    def model_path(self) -> str:
        return resolve_model_path(self.runner.model, self.cache)

    def load_model(self, keep_adapter: bool = False) -> tuple[Any, Any]:
        return load_model(self.model_path(), keep_adapter)

    def training_args(self) -> dict[str, Any]:
        """Keyword arguments every stage's TrainingArguments subclass takes."""
        import torch

        cfg = self.settings
        ds = deepspeed_config(cfg)
        if ds is not None and not torch.cuda.is_available():
            _deepspeed_on_cpu()
        return {
            "output_dir": self.a.output_dir,
            "max_steps": self.a.rung_steps[-1],
            "learning_rate": cfg.learning_rate,
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "per_device_eval_batch_size": cfg.per_device_eval_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "warmup_steps": cfg.warmup_ratio,  # a float < 1 is a ratio
            "weight_decay": cfg.weight_decay,
            "lr_scheduler_type": cfg.lr_scheduler_type,
            # The new name wins over trl's default gradient_checkpointing=True.
            "activation_checkpointing": cfg.gradient_checkpointing,
            "bf16": cfg.mixed_precision == "bf16",  # explicit: trl's configs default to bf16
            "fp16": cfg.mixed_precision == "fp16",
            "deepspeed": ds,
            "eval_strategy": "no",  # the rung callback asks for evaluations
            "save_strategy": "no",
            "logging_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "seed": self.a.seed,
            "use_cpu": not torch.cuda.is_available(),
            "dataloader_num_workers": 0,
            "include_num_input_tokens_seen": "non_padding",
        }

    def rung_callback(
        self,
        metric_map: dict[str, str] | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
    ) -> RungCallback:
        self.callback = RungCallback(
            self.a.rung_steps,
            self.reporter,
            extra=lambda: {
                "peak_memory_mb": peak_memory_mb(),
                "device_seconds": self.clock.device_seconds,
            },
            metric_map=metric_map,
            evaluate=evaluate,
        )
        return self.callback

    # ------------------------------------------------------------ the run

    def train(
        self,
        trainer: Any,
        tokenizer: Any,
        quality: Callable[[Any], dict[str, float | None]] | None = None,
    ) -> TrialResult:
        """Train, then (rank 0) measure quality, decode latency, throughput and cost.

        ``quality(model)`` adds the stage's final quality metrics.
        """
        callback = self.callback
        assert callback is not None, "build the Trainer with trial.rung_callback()"
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        self._record_rank(trainer)
        if callback.stopped:
            return TrialResult("stopped", rungs=callback.rungs, reason=callback.reason)
        final: dict[str, float] = dict(callback.rungs[-1]["metrics"]) if callback.rungs else {}
        net = _whole_model(trainer)  # every rank takes part when ZeRO-3 shards the weights
        if not trainer.is_world_process_zero():
            return TrialResult("complete", metrics=final, rungs=callback.rungs)
        if quality is not None:
            final.update({k: v for k, v in quality(net).items() if v is not None})
        latency = measure_decode_latency(net, tokenizer, FIXED_PROMPTS, max_new_tokens=8)
        final["decode_latency_ms"] = latency.ms_per_token
        final["ttft_ms"] = latency.ttft_ms
        seen = float(trainer.state.num_input_tokens_seen)
        final["tokens_per_second"] = seen / train_seconds if train_seconds > 0 else 0.0
        if self.runner.save_model:
            self._save(net, tokenizer)
        final["peak_memory_mb"] = peak_memory_mb()
        # One reading of the running clock, so the cost is exactly wall time x devices.
        seconds = self.clock.seconds
        final["wall_seconds"] = seconds
        final["device_seconds"] = seconds * self.clock.devices
        final = {k: v for k, v in final.items() if math.isfinite(v) or k == "eval_loss"}
        return TrialResult("complete", metrics=final, rungs=callback.rungs)

    def _save(self, net: Any, tokenizer: Any) -> None:
        """The trained model (or adapter) in ``output_dir/model``, loadable by a next stage."""
        out = Path(self.a.output_dir) / "model"
        net.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))

    def _record_rank(self, trainer: Any) -> None:
        """Each rank writes the settings it trained with and a checksum of its weights, so
        a multi-process trial can be checked for ranks that disagreed."""
        import torch

        with torch.no_grad():
            checksum = sum(float(p.detach().float().sum()) for p in trainer.model.parameters())
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        record = {
            "rank": process_rank(),
            "deepspeed_zero_stage": plugin.zero_stage if plugin is not None else 0,
            "world_size": self.world,
            "settings": dataclasses.asdict(self.settings),
            "param_checksum": checksum,
            "steps": int(trainer.state.global_step),
            "reference": _reference(trainer),
        }
        out = Path(self.a.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{process_rank()}.json").write_text(
            json.dumps(record, sort_keys=True, default=str)
        )
