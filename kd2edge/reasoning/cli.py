"""`kd2edge generate-data`, `kd2edge grpo` and `kd2edge eval-rationales`: thin commands over kd2edge.reasoning."""

from __future__ import annotations

import click

from kd2edge.cli_common import emit, info, json_option, table, warn
from kd2edge.errors import ConfigError

_teacher = click.option("--teacher", default="embedded", show_default=True,
                        help="Teacher: 'embedded', a hub id, a folder or a .gguf file.")
_data = click.option("--data", default="embedded", show_default=True,
                     help="Dataset: 'embedded', a hub id, or a SQuAD JSON / CSQA / Dolly JSONL file.")
_limit = click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N items.")
_seed = click.option("--seed", type=int, default=0, show_default=True)


def _data_summary(s: dict) -> str:
    rows = [[reason, n] for reason, n in sorted(s["dropped"].items())]
    lines = [f"{s['method']} data from {s['teacher']} on {s['data']} ({s['split']}): "
             f"kept {s['kept']} of {s['items']} (keep={s['keep']}, mean answer score {s['mean_score']})"]
    if s.get("usable_rationales") is not None:
        lines.append(f"usable rationales: {s['usable_rationales']}")
    if rows:
        lines.append(table(rows, ["dropped because", "items"]))
    lines.append(f"wrote {s['out']}")
    return "\n".join(lines)


@click.command("generate-data")
@_teacher
@_data
@click.option("--method", type=click.Choice(["answer", "rationale", "critique-revision"]), default="rationale",
              show_default=True, help="What the teacher writes: an answer; a rationale then an answer; or a "
                                      "draft rationale, a critique against the gold answer and a revision.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="JSONL file to write.")
@_limit
@click.option("--keep", type=click.Choice(["correct", "all"]), default="correct", show_default=True,
              help="Keep only items whose final answer is right, or all usable ones.")
@click.option("--split", default="train", show_default=True)
@_seed
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=160, show_default=True)
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Answer score (F1 / Rouge-L; choice 0 or 1) counted as right.")
@json_option
def generate_data(teacher, data, method, out, limit, keep, split, seed, batch_size, max_new_tokens, min_score,
                  as_json):
    """Have the teacher write answers or rationales for training, filtered by correctness.

    Every line of the JSONL file holds the item, the prompts, the raw teacher outputs,
    the parsed rationale and answer, its score, and whether it was kept (or why not).
    """
    from kd2edge.reasoning.generate import generate_data as run

    info(f"generate-data: {method} from {teacher} on {data}")
    summary = run(teacher, data, method, out, limit=limit, keep=keep, split=split, seed=seed,
                  batch_size=batch_size, max_new_tokens=max_new_tokens, min_score=min_score)
    emit(summary, as_json, _data_summary)


def _grpo_summary(r: dict) -> str:
    names = list(r["weights"])
    rows = [[s["step"], f"{s['reward']:.3f}", *[f"{s[n]:.3f}" for n in names], f"{s['frac_reward_zero_std']:.2f}"]
            for s in r["steps"]]
    return "\n".join([table(rows, ["step", "reward", *names, "equal groups"]),
                      f"saved {r['out_dir']} ({r['seconds']} s)"])


@click.command("grpo")
@click.option("--model", required=True, help="The student to train: a model folder or a distill artifact.")
@_data
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True, help="Folder for the trained model.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--rewards", "weights", default="correctness=1,format=0.2", show_default=True,
              help="Reward weights, NAME=W,... (names: correctness, format).")
@click.option("--num-generations", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--prompts-per-step", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-6, show_default=True)
@click.option("--split", default="train", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=64, show_default=True)
@_seed
@json_option
def grpo(model, data, out, steps, weights, num_generations, prompts_per_step, max_new_tokens, lr, split, limit,
         seed, as_json):
    """Fine-tune a distilled student with GRPO on answer-correctness and format rewards."""
    from kd2edge.reasoning.grpo import run_grpo_on_data
    from kd2edge.reasoning.rewards import parse_weights

    try:
        reward_weights = parse_weights(weights)
    except ValueError as e:
        raise ConfigError(f"--rewards: {e}", source="grpo") from None
    result = run_grpo_on_data(model, data, out, split=split, limit=limit, seed=seed, steps=steps,
                              reward_weights=reward_weights, num_generations=num_generations,
                              prompts_per_step=prompts_per_step, max_new_tokens=max_new_tokens, lr=lr)
    for message in result["warnings"]:
        warn(message)
    emit(result, as_json, _grpo_summary)


@click.command("eval-rationales")
@click.option("--model", required=True, help="A model folder, GPTQ checkpoint or exported artifact.")
@click.option("--data", required=True, help="A CommonsenseQA-style dataset (file or hub id).")
@click.option("--split", default="validation", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@_seed
@json_option
def eval_rationales(model, data, split, limit, max_new_tokens, seed, as_json):
    """Multiple-choice accuracy with and without a rationale written before the letter."""
    from kd2edge.data.loaders import load_qa
    from kd2edge.scoring.methods import evaluate_with_rationales

    items = load_qa(data, split=split, limit=limit, seed=seed).items
    result = evaluate_with_rationales(model, items, max_new_tokens=max_new_tokens)
    emit(result, as_json, lambda r: (f"{r['n']} items: plain accuracy {r['plain']['accuracy']:.3f} "
                                     f"({r['plain']['mode']}), with rationale {r['rationale']['accuracy']:.3f} "
                                     f"(answered {r['rationale']['answered']:.0%}, "
                                     f"formatted {r['rationale']['formatted']:.0%})"))
