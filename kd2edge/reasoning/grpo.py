"""GRPO after KD: TRL's GRPOTrainer with kd2edge's QA rewards.

GRPO (Shao et al., 2024) samples `num_generations` completions per prompt, scores each
with the weighted reward r = sum_k w_k r_k (`kd2edge.reasoning.rewards`), and uses the
completion's advantage A_i = (r_i - mean_group(r)) / std_group(r) in a clipped policy
gradient. A group whose completions all get the same reward has A = 0 and teaches
nothing, hence the warnings on constant rewards.

Prompts are the rationale prompts the student was distilled with
(`rationale_student_prompt`, through the chat template), so the format reward asks for
what KD taught.

CPU: works with tiny models in seconds (tests). GPU machines: the same call; bf16 is
used where the GPU supports it. For real runs raise `num_generations` (8-16),
`prompts_per_step` (8-32) and `max_new_tokens` (128-256); TRL's `use_vllm` is not wired.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

from kd2edge.data.items import QAItem
from kd2edge.errors import DataError
from kd2edge.reasoning.rewards import (REWARDS, check_reward_weights, warn_if_constant,
                                       zero_variance_warning)

DEFAULT_WEIGHTS = {"correctness": 1.0, "format": 0.2}
REWARDS_PLOT = "grpo_rewards.png"


def completion_text(completion) -> str:
    """A TRL completion as text: conversational ([{"role", "content"}]) or plain."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def make_reward_funcs(items: Sequence[QAItem], names: Sequence[str]) -> list:
    """TRL reward callables (named after the reward, as TRL logs them) over dataset column `item_index`."""
    def bind(name):
        score = REWARDS[name]

        def reward(prompts, completions, item_index, **kwargs):
            return [score(completion_text(c), items[i]) for c, i in zip(completions, item_index)]

        reward.__name__ = name
        return reward

    return [bind(name) for name in names]


def step_rows(log_history: Sequence[Mapping], names: Sequence[str]) -> list[dict]:
    """The per-step reward rows of a Trainer log history (TRL logs every step with logging_steps=1)."""
    rows = []
    for entry in log_history:
        if "reward" not in entry:
            continue
        row = {"step": int(entry.get("step", len(rows) + 1)), "reward": entry["reward"],
               "reward_std": entry.get("reward_std"), "frac_reward_zero_std": entry.get("frac_reward_zero_std")}
        for name in names:
            row[name] = entry.get(f"rewards/{name}/mean")
        for key in ("loss", "kl", "completions/mean_length"):
            if key in entry:
                row[key.split("/")[-1]] = entry[key]
        rows.append(row)
    return rows


def run_grpo(model_dir: str | Path, items: Sequence[QAItem], out_dir: str | Path, steps: int = 10,
             reward_weights: Mapping[str, float] | None = None, num_generations: int = 4,
             max_new_tokens: int = 64, lr: float = 1e-6, seed: int = 0, prompts_per_step: int = 1,
             temperature: float = 1.0, beta: float = 0.0, progress: bool = True) -> dict:
    """Fine-tune a (distilled) model with GRPO on QA rewards and save it as a transformers folder.

    Args:
        model_dir: a transformers model folder (the KD student).
        items: training questions with gold answers (extractive, multiple choice, free
            text; code items carry `meta["tests"]`).
        out_dir: where the trained model, its tokenizer, manifest.json and the reward
            plot are written (atomically: nothing is left on failure).
        steps: optimizer steps (each on `prompts_per_step` prompts x `num_generations`).
        reward_weights: {"correctness": w, "format": w} (default DEFAULT_WEIGHTS).
        num_generations: completions sampled per prompt (the GRPO group), >= 2.
        max_new_tokens: completion length limit.
        lr: learning rate.
        seed: sampling and data-order seed.
        prompts_per_step: prompts per optimizer step.
        temperature: sampling temperature of the completions.
        beta: KL coefficient to the reference model (0: no reference model, TRL's default).

    Returns:
        {"steps": [{step, reward, reward_std, frac_reward_zero_std, correctness, format, loss, ...}],
         "weights", "warnings", "out_dir", "reload_max_abs_diff", "seconds"}.

    Raises:
        DataError: no item, no item with a gold answer, num_generations < 2, steps < 1,
            or bad reward weights.
    """
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from kd2edge.artifacts import Artifact, atomic_dir, work_dir, write_artifact
    from kd2edge.models import load_causal_lm, reload_max_abs_diff
    from kd2edge.data.prompts import rationale_student_prompt

    try:
        weights = check_reward_weights(DEFAULT_WEIGHTS if reward_weights is None else reward_weights)
    except ValueError as e:
        raise DataError(f"reward weights: {e}") from None
    items = [it for it in items if any(a.strip() for a in it.gold) or it.meta.get("tests")]
    if not items:
        raise DataError("GRPO needs items with gold answers (or unit tests) to reward: give a labelled dataset")
    if num_generations < 2:
        raise DataError(f"num_generations={num_generations}: GRPO compares completions within a group, use >= 2")
    if steps < 1:
        raise DataError(f"steps={steps}: give at least 1 GRPO step")
    messages = []
    constant = warn_if_constant(weights, items)
    if constant:
        messages.append(constant)
    names = list(weights)
    out_dir = Path(out_dir)
    cuda = torch.cuda.is_available()
    model, tokenizer = load_causal_lm(model_dir, device="cuda" if cuda else "cpu")
    model.train()
    # Decoder LMs take no token_type_ids; a tokenizer that returns them breaks TRL's generate call.
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": rationale_student_prompt(it)}],
                               "item_index": i} for i, it in enumerate(items)])
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        args = GRPOConfig(
            output_dir=str(work_dir(tmp)), max_steps=steps, learning_rate=lr, seed=seed,
            per_device_train_batch_size=num_generations * prompts_per_step, gradient_accumulation_steps=1,
            num_generations=num_generations, max_completion_length=max_new_tokens, temperature=temperature,
            beta=beta, reward_weights=[weights[n] for n in names], logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(),
            disable_tqdm=not progress, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=make_reward_funcs(items, names), args=args,
                              train_dataset=data, processing_class=tokenizer)
        # Without tqdm the Trainer prints every log dict to stdout; stdout is kept for --json.
        trainer.remove_callback(PrinterCallback)
        # The progress bar's log lines (tqdm.write) go to stdout; stdout is kept for --json.
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            # TRL warns on CPU about features it cannot use (vLLM, liger); ours are listed in `warnings`.
            warnings.filterwarnings("ignore", category=UserWarning, module="trl")
            trainer.train()
        rows = step_rows(trainer.state.log_history, names)
        trained = trainer.model.eval()
        trained.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        zero = zero_variance_warning([r["frac_reward_zero_std"] for r in rows
                                      if r["frac_reward_zero_std"] is not None])
        if zero:
            messages.append(zero)
        probe = tokenizer(rationale_student_prompt(items[0]))["input_ids"][:64]
        reload_diff = reload_max_abs_diff(trained, tmp, probe)
        plot = _plot_rewards(rows, names, tmp / REWARDS_PLOT)
        seconds = round(time.perf_counter() - started, 2)
        metrics = {"steps": rows, "weights": weights, "warnings": messages, "reload_max_abs_diff": reload_diff,
                   "seconds": seconds, "plot": plot}
        config = {"model_dir": str(model_dir), "steps": steps, "reward_weights": weights,
                  "num_generations": num_generations, "max_new_tokens": max_new_tokens, "lr": lr, "seed": seed,
                  "prompts_per_step": prompts_per_step, "temperature": temperature, "beta": beta,
                  "items": len(items)}
        write_artifact(tmp, "grpo", config, Artifact.external(model_dir, kind="model"), metrics, kind="model",
                       timings={"train_s": seconds})
    return {**metrics, "out_dir": str(out_dir)}


def _plot_rewards(rows: Sequence[dict], names: Sequence[str], path: Path) -> str | None:
    """Mean reward per step (total and per reward) as a PNG; None without rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["step"] for r in rows]
    ax.plot(x, [r["reward"] for r in rows], label="weighted reward", marker="o")
    for name in names:
        ax.plot(x, [r[name] for r in rows], label=name, linestyle="--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # steps are whole numbers
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def run_grpo_on_data(model: str, data: str, out_dir: str | Path, split: str = "train", limit: int | None = 64,
                     seed: int = 0, **kwargs) -> dict:
    """`run_grpo` on a dataset spec (the `kd2edge grpo` command).

    Args:
        model: a model spec (`kd2edge.models.resolve_model`: folder, artifact, "embedded").
        data: a dataset spec (`kd2edge.data.loaders.load_qa`).
        out_dir, seed, **kwargs: passed to `run_grpo`.
        split, limit: which items to train on.

    Raises:
        DataError, ModelError: as `load_qa`, `resolve_model` and `run_grpo`.
    """
    from kd2edge.data.loaders import load_qa
    from kd2edge.models import resolve_model

    items = load_qa(data, split=split, limit=limit, seed=seed).items
    result = run_grpo(resolve_model(model).path, items, out_dir, seed=seed, **kwargs)
    return {"model": model, "data": data, "split": split, "items": len(items), **result}


# GRPO after KD inside the distill stage: small fixed settings suited to a CPU
# (`kd2edge grpo` exposes them all).
KD_GRPO_WEIGHTS = {"correctness": 1.0, "format": 0.2}
KD_GRPO_GENERATIONS, KD_GRPO_MAX_NEW_TOKENS, KD_GRPO_LR = 4, 64, 1e-6


def grpo_after_kd(student, tokenizer, items: Sequence[QAItem], work: Path, steps: int, seed: int) -> tuple[object, dict]:
    """GRPO on a KD-trained student (`run_grpo`), resumable through a stage's work dir.

    The KD student is saved to work/kd_student and GRPO writes work/grpo; a resumed run
    whose GRPO already finished reads that folder back.

    Returns:
        (the GRPO-trained student, loaded in fp32 on the CPU, in eval mode; run_grpo's result
        plus `info`: the settings used, for the distill manifest).
    """
    from kd2edge.artifacts import Artifact
    from kd2edge.errors import ArtifactError
    from kd2edge.models import load_causal_lm

    out = work / "grpo"
    try:
        result = {**Artifact.load(out, stage="grpo").metrics, "out_dir": str(out)}
    except ArtifactError:   # not run yet, or interrupted: GRPO writes its folder atomically
        kd_dir = work / "kd_student"
        student.save_pretrained(kd_dir, safe_serialization=True)
        tokenizer.save_pretrained(kd_dir)
        result = run_grpo(kd_dir, items, out, steps=steps, reward_weights=KD_GRPO_WEIGHTS,
                          num_generations=KD_GRPO_GENERATIONS, max_new_tokens=KD_GRPO_MAX_NEW_TOKENS, lr=KD_GRPO_LR,
                          seed=seed)
    model, _ = load_causal_lm(out)
    result["info"] = {"weights": result["weights"], "warnings": result["warnings"], "plot": result.get("plot"),
                      "num_generations": KD_GRPO_GENERATIONS, "max_new_tokens": KD_GRPO_MAX_NEW_TOKENS,
                      "lr": KD_GRPO_LR, "reload_max_abs_diff": result["reload_max_abs_diff"],
                      "seconds": result["seconds"]}
    return model, result
