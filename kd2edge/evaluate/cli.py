"""`kd2edge evaluate`: score one model on a QA split (thin: parse, evaluate, print)."""

from __future__ import annotations

import click

from kd2edge.cli_common import emit, info, json_option, table, warn


@click.command("evaluate")
@click.option("--model", "model_path", required=True, metavar="PATH",
              help="An exported artifact (model.onnx), a GPTQ checkpoint, 'embedded', a hub id, a folder or a .gguf.")
@click.option("--data", "data_spec", default="embedded", show_default=True, metavar="SPEC",
              help="'embedded', a hub id, or a SQuAD JSON / MLQA / CommonsenseQA / Dolly JSONL file.")
@click.option("--split", default="validation", show_default=True)
@click.option("--shots", type=click.IntRange(0, 1), default=1, show_default=True,
              help="0: zero-shot; 1: one example from the train split (never the item).")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help="At most N items (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Picks the items and the examples.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=24, show_default=True)
@click.option("--mode", type=click.Choice(["loglik", "generate"]), default="loglik", show_default=True,
              help="Multiple choice: score each choice's log-likelihood, or generate an answer (letter or text).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts per generation batch (PyTorch models).")
@click.option("--predictions", "predictions_path", type=click.Path(dir_okay=False), default=None,
              help="Write per-item predictions (JSONL) here.")
@json_option
def evaluate(model_path, data_spec, split, shots, limit, seed, max_new_tokens, mode, batch_size,
             predictions_path, as_json):
    """Score QA accuracy: EM/F1 (SQuAD, MLQA), accuracy (CommonsenseQA), Rouge-L (Dolly)."""
    from kd2edge.scoring.evaluator import evaluate as run_evaluation

    info(f"evaluating {model_path} on {data_spec}:{split} ({shots}-shot, {f'up to {limit}' if limit else 'all'} items)")
    result = run_evaluation(model_path, data_spec, split=split, shots=shots, limit=limit or None, seed=seed,
                            max_new_tokens=max_new_tokens, predictions_path=predictions_path,
                            progress=True, mode=mode, batch_size=batch_size)
    for w in result["warnings"]:
        warn(w)
    emit(result, as_json, _summary)


def _summary(r: dict) -> str:
    keys = [k for k in ("em", "f1", "accuracy", "accuracy_norm", "rouge_l") if k in r]
    rows = [["all", r["n"], *(f"{r[k]:.3f}" for k in keys)]]
    rows += [[lang, s["n"], *(f"{s[k]:.3f}" for k in keys)] for lang, s in r.get("by_language", {}).items()]
    lines = [f"{r['model']} ({r['backend']}) on {r['dataset']}:{r['split']}, {r['shots']}-shot, "
             f"{r['task']}{' (' + r['mode'] + ')' if r['task'] == 'multiple_choice' else ''}, {r['seconds']:.1f} s",
             table(rows, ["items", "n", *keys])]
    if r.get("predictions"):
        lines.append(f"predictions: {r['predictions']}")
    return "\n".join(lines)
