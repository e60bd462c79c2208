"""The SFT stage: a full fine-tune with trl's SFTTrainer (the LoRA stage adds an adapter).

Quality: eval loss on held-out pairs (perplexity too) and, where the data has checkable
answers, exact-match accuracy of greedy answers. In evaluation mode (``runner.evaluate``)
the same two are measured on the scored split, with ``runner.model`` as it is (an adapter
merged into its base), and nothing is trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from stagetune.contract.training import SFTTraining
from stagetune.trainer.assignment import Assignment, TrialResult
from stagetune.trainer.rungs import Reporter
from stagetune.trainer.stages.common import Trial, greedy_completions, trainer_quality
from stagetune.trainer.tasks import answer_of

__all__ = ["run_sft", "run_sft_like", "exact_match"]

S = TypeVar("S", bound=SFTTraining)


def exact_match(model: Any, tokenizer: Any, eval_rows: Any, limit: int = 16) -> float | None:
    """Fraction of held-out prompts whose greedy answer's last number is the reference's;
    None when the data has no checkable answers."""
    rows = [r for r in eval_rows.select(range(min(limit, len(eval_rows))))]
    if not rows or answer_of(rows[0]["completion"]) is None:
        return None
    texts = greedy_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=8)
    hits = sum(answer_of(t) == answer_of(r["completion"]) for t, r in zip(texts, rows, strict=True))
    return hits / len(rows)


def run_sft_like(
    a: Assignment,
    reporter: Reporter,
    settings_type: type[S],
    peft_config: Callable[[S], Any] | None = None,
) -> TrialResult:
    """SFTTrainer on prompt/completion pairs; with ``peft_config`` it trains an adapter."""
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    with Trial(a, reporter, settings_type) as t:
        data = t.data()
        held_out = data.dataset(data.held_out)
        # trl insists on a train_dataset; an evaluation hands it the scored split and never
        # calls train().
        train = held_out if t.evaluating else data.dataset("train")
        model, tokenizer = t.load_model()
        args = SFTConfig(**t.training_args(), max_length=t.settings.max_length)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            peft_config=(
                peft_config(t.settings) if peft_config is not None and not t.evaluating else None
            ),
            callbacks=[t.rung_callback()],
        )
        kept: list[tuple[str, Any]] = [(data.held_out, trainer.eval_dataset)]
        if not t.evaluating:
            kept.insert(0, ("training", trainer.train_dataset))
        for name, rows in kept:
            if len(rows) == 0:  # trl drops pairs whose completion is cut off entirely
                raise ValueError(
                    f"runner.training.max_length: every {name} example's completion lies "
                    f"beyond {t.settings.max_length} tokens; raise max_length"
                )

        def quality(net: Any) -> dict[str, float | None]:
            return {"exact_match": exact_match(net, tokenizer, held_out)}

        if t.evaluating:
            return t.evaluate(
                trainer.model,
                tokenizer,
                lambda: {
                    **trainer_quality(trainer, {"eval_loss": "eval_loss"}),
                    **quality(trainer.model),
                },
            )
        return t.train(trainer, tokenizer, quality=quality)


def run_sft(a: Assignment, reporter: Reporter) -> TrialResult:
    return run_sft_like(a, reporter, SFTTraining)
