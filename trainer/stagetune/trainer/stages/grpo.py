"""The GRPO stage: online RL with trl's GRPOTrainer and reward functions named in the
config (``runner.training.reward_functions``; the names are
``stagetune.contract.training.REWARD_FUNCTIONS``).

Quality: the mean reward of greedy completions of held-out prompts, measured at every rung
by the same reward functions the policy is trained on (summed, as trl sums them). In
evaluation mode (``runner.evaluate``) the same mean reward of ``runner.model`` on the named
split, without training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stagetune.contract.training import GRPOTraining
from stagetune.trainer.assignment import Assignment, TrialResult
from stagetune.trainer.rungs import Reporter
from stagetune.trainer.splits import Split
from stagetune.trainer.stages.common import Trial, greedy_completions
from stagetune.trainer.tasks import answer_of

__all__ = ["run_grpo", "REWARDS", "reward_functions"]

Reward = Callable[..., list[float | None]]


def exact_match(completions: list[str], answer: list[str], **_: Any) -> list[float | None]:
    """1.0 when the completion's last number is the row's answer."""
    return [
        float(answer_of(c) is not None and answer_of(c) == a)
        for c, a in zip(completions, answer, strict=True)
    ]


def has_number(completions: list[str], **_: Any) -> list[float | None]:
    """1.0 when the completion contains a number at all: a format reward that gives a
    fresh model some signal before it gets any answer right."""
    return [float(answer_of(c) is not None) for c in completions]


REWARDS: dict[str, Reward] = {"exact_match": exact_match, "has_number": has_number}


def reward_functions(names: Sequence[str]) -> list[Reward]:
    chosen = list(names)
    unknown = [n for n in chosen if n not in REWARDS]
    if unknown:
        raise ValueError(
            f"runner.training.reward_functions: unknown {unknown}; one of {sorted(REWARDS)}"
        )
    return [REWARDS[n] for n in chosen]


def mean_reward(
    model: Any, tokenizer: Any, rows: Any, rewards: list[Reward], max_new_tokens: int
) -> float:
    """Mean summed reward of greedy completions of ``rows`` (batch of one, no sampling)."""
    prompts = list(rows["prompt"])
    answers = list(rows["answer"])
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens)
    totals = [0.0] * len(completions)
    for fn in rewards:
        for i, r in enumerate(fn(prompts=prompts, completions=completions, answer=answers)):
            totals[i] += r if r is not None else 0.0
    return sum(totals) / max(1, len(totals))


def run_grpo(a: Assignment, reporter: Reporter) -> TrialResult:
    from trl import GRPOConfig, GRPOTrainer  # type: ignore[attr-defined]

    with Trial(a, reporter, GRPOTraining) as t:
        cfg = t.settings
        rewards = reward_functions(cfg.reward_functions)
        generations = cfg.num_generations
        batch = cfg.per_device_train_batch_size * t.world * cfg.gradient_accumulation_steps
        if batch % generations:
            raise ValueError(
                f"num_generations: {generations} does not divide the generation batch "
                f"{batch} (per_device_train_batch_size x processes x gradient_accumulation_steps)"
            )
        data = t.data()

        def prompts(split: Split) -> Any:
            rows = data.dataset(split)
            return rows.map(
                lambda row: {"prompt": row["prompt"], "answer": answer_of(row["completion"]) or ""},
                remove_columns=rows.column_names,
            )

        evals = prompts(data.held_out)
        new_tokens = cfg.max_completion_length
        if t.evaluating:
            net, tokenizer = t.load_model()
            return t.evaluate(
                net,
                tokenizer,
                lambda: {"mean_reward": mean_reward(net, tokenizer, evals, rewards, new_tokens)},
            )
        model, tokenizer = t.load_model(keep_adapter=True)
        train = prompts("train")
        # GRPOTrainer counts prompt + completion tokens itself; the Trainer's count would
        # look for input_ids in batches that have none.
        args = GRPOConfig(
            **{**t.training_args(), "include_num_input_tokens_seen": "no"},
            beta=cfg.beta,
            num_generations=generations,
            temperature=cfg.temperature,
            max_completion_length=new_tokens,
        )
        policy: list[Any] = []

        def rung_eval() -> dict[str, float]:
            return {
                "mean_reward": mean_reward(policy[0].model, tokenizer, evals, rewards, new_tokens)
            }

        trainer = GRPOTrainer(
            model=model,
            reward_funcs=list[Any](rewards),
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[t.rung_callback(evaluate=rung_eval)],
        )
        policy.append(trainer)
        return t.train(trainer, tokenizer)
