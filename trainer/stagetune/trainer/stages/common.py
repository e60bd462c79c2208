"""What every stage runner shares: settings, the base model, the data splits, the Trainer
arguments (the systems knobs included), rung reporting and the final measurements.

Latency, memory and device-seconds are measured here, by ``objectives.measure``, the same
way for every stage; a stage adds only its quality metric. Two modes: a training trial
(``Trial.train``) trains on train and measures quality on eval; an evaluation trial
(``runner.evaluate``, ``Trial.evaluate``) trains nothing and measures ``runner.model`` on the
split it names. Either way the final metrics carry the trial's ``seed``, the overlap between
the splits and the rows of each split read (``data.<split>_rows``).
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

from stagetune.contract.spec import MAX_MAGNITUDE, ModelSource, RunnerSettings, parse_runner
from stagetune.contract.training import TrainingSettings
from stagetune.objectives.measure import (
    FIXED_PROMPTS,
    DeviceClock,
    measure_decode_latency,
    peak_memory_mb,
)
from stagetune.trainer.assignment import Assignment, TrialResult, process_rank
from stagetune.trainer.model_upload import upload_saved_model
from stagetune.trainer.rungs import Reporter, RungCallback
from stagetune.trainer.stages.distributed import (
    deepspeed_config,
    deepspeed_on_cpu,
    reference_kind,
    whole_model,
)
from stagetune.trainer.tasks import STAGE_EXAMPLES, Mode, TrialData, prepare_splits
from stagetune.trainer.tiny_model import default_cache_dir, ensure_model

__all__ = [
    "Trial",
    "deepspeed_config",
    "greedy_completions",
    "load_model",
    "resolve_model_path",
    "served",
    "trainer_quality",
]

S = TypeVar("S", bound=TrainingSettings)
_URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:", "file:")


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
    from stagetune.contract.mlflow_layout import no_telemetry

    no_telemetry()
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


def served(model: Any) -> Any:
    """The model as it is served and as the next stage loads it: a LoRA adapter merged
    into its base (in place), anything else as it is. Final quality and decode latency
    are measured on this form; the adapter itself is saved before the merge."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        return model.merge_and_unload()
    return model


def trainer_quality(trainer: Any, metric_map: dict[str, str]) -> dict[str, float | None]:
    """One run of the Trainer's evaluation, its keys renamed by ``metric_map`` (Trainer key
    -> stagetune metric); a key the evaluation did not produce is None."""
    metrics = trainer.evaluate()
    out: dict[str, float | None] = {}
    for theirs, ours in metric_map.items():
        value = metrics.get(theirs)
        out[ours] = float(value) if isinstance(value, int | float) else None
    return out


class Trial(Generic[S]):
    """One trial of any stage, from model loading to the final measurements.

    ``runner`` is the study's runner section, typed, with the trial's params applied to
    its training settings; ``settings`` is that training part as the stage's own class
    (``settings_type``). Use as a context manager: every random generator is seeded with
    the trial's seed on entry, and the device clock runs from entry (model loading
    included) to the final measurement. ``data()`` gives the splits this trial may read;
    ``train`` runs a built Trainer, ``evaluate`` (evaluation mode) scores the model without
    training; each returns the TrialResult.
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
        self.mode: Mode = self.runner.evaluate or "train"
        self.loaded: TrialData | None = None

    @property
    def evaluating(self) -> bool:
        """An evaluation trial: it trains nothing and reads only the split it scores."""
        return self.mode != "train"

    def __enter__(self) -> Trial[S]:
        from transformers import set_seed

        self.clock.__enter__()
        # Before any model is built: a LoRA adapter is initialised before the Trainer seeds.
        set_seed(self.a.seed)
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

    def load_reference(self) -> Any | None:
        """``runner.reference_model`` loaded as a plain model (an adapter merged); None when
        the runner names none."""
        source = self.runner.reference_model
        if source is None:
            return None
        return load_model(resolve_model_path(source, self.cache))[0]

    def data(self) -> TrialData:
        """The splits this trial may read (train and eval; in evaluation mode only the
        scored split), recorded in ``output_dir/data-rank-N.json`` as they are read."""
        if self.loaded is None:
            prepared = prepare_splits(STAGE_EXAMPLES[self.a.stage], self.runner.data)
            ledger = Path(self.a.output_dir) / f"data-rank-{process_rank()}.json"
            self.loaded = TrialData(prepared, self.mode, ledger)
        return self.loaded

    def training_args(self) -> dict[str, Any]:
        """Keyword arguments every stage's TrainingArguments subclass takes."""
        import torch

        cfg = self.settings
        ds = deepspeed_config(cfg)
        if ds is not None and not torch.cuda.is_available():
            deepspeed_on_cpu()
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
                "seed": float(self.a.seed),  # so a trial stopped at a rung can be re-run
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
        assert not self.evaluating, "an evaluation trial trains nothing: use evaluate()"
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        timing = {"train_end": time.time()}
        if callback.first_step is not None:
            timing["first_step"] = callback.first_step
        self._record_rank(trainer)
        if callback.stopped:
            return TrialResult(
                "stopped", rungs=callback.rungs, reason=callback.reason, timing=timing
            )
        final: dict[str, float] = dict(callback.rungs[-1]["metrics"]) if callback.rungs else {}
        net = whole_model(trainer)  # every rank takes part when ZeRO-3 shards the weights
        if not trainer.is_world_process_zero():
            return TrialResult("complete", metrics=final, rungs=callback.rungs)
        if self.runner.save_model:
            self._save(net, tokenizer)
        net = served(net)
        if quality is not None:
            final.update({k: v for k, v in quality(net).items() if v is not None})
        seen = float(trainer.state.num_input_tokens_seen)
        final["tokens_per_second"] = seen / train_seconds if train_seconds > 0 else 0.0
        return TrialResult(
            "complete",
            metrics=self._measured(net, tokenizer, final),
            rungs=callback.rungs,
            timing=timing,
        )

    def evaluate(
        self, net: Any, tokenizer: Any, quality: Callable[[], dict[str, float | None]]
    ) -> TrialResult:
        """Evaluation mode: no training. ``quality()`` scores the model on the held-out split
        (every rank takes part, as in a Trainer's evaluation); rank 0 then measures decode
        latency, memory (here: of the evaluation, not of a training run) and cost, and
        reports them under the names a training trial uses."""
        assert self.evaluating, "a training trial trains: use train()"
        final = {k: v for k, v in quality().items() if v is not None}
        if "eval_loss" in final and math.isfinite(final["eval_loss"]):
            final["perplexity"] = min(math.exp(min(final["eval_loss"], 50.0)), MAX_MAGNITUDE)
        if process_rank() != 0:
            return TrialResult("complete", metrics=final)
        return TrialResult("complete", metrics=self._measured(served(net), tokenizer, final))

    def _measured(self, net: Any, tokenizer: Any, final: dict[str, float]) -> dict[str, float]:
        """``final`` with decode latency, peak memory, cost, the seed and the data's record."""
        latency = measure_decode_latency(net, tokenizer, FIXED_PROMPTS, max_new_tokens=8)
        final["decode_latency_ms"] = latency.ms_per_token
        final["ttft_ms"] = latency.ttft_ms
        final["peak_memory_mb"] = peak_memory_mb()
        final["seed"] = float(self.a.seed)
        if self.loaded is not None:
            final.update(self.loaded.metrics())
        # One reading of the running clock, so the cost is exactly wall time x devices.
        seconds = self.clock.seconds
        final["wall_seconds"] = seconds
        final["device_seconds"] = seconds * self.clock.devices
        return {k: v for k, v in final.items() if math.isfinite(v) or k == "eval_loss"}

    def _save(self, net: Any, tokenizer: Any) -> None:
        """The trained model (or adapter) in ``output_dir/model``, loadable by a next stage."""
        out = Path(self.a.output_dir) / "model"
        net.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        # Into the trial's MLflow run, before the worker reports completion: the server
        # promotes it from there, and other machines load it by models:/ URI.
        upload_saved_model(self.a, self.runner, out)

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
            "reference": reference_kind(trainer),
        }
        out = Path(self.a.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{process_rank()}.json").write_text(
            json.dumps(record, sort_keys=True, default=str)
        )
        if process_rank() == 0:  # in trial.log: what really trained, not what was asked
            engine = f"DeepSpeed ZeRO-{plugin.zero_stage}" if plugin is not None else "no DeepSpeed"
            print(f"trained {record['steps']} steps on {self.world} process(es), {engine}")
