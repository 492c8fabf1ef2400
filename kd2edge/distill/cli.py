"""`kd2edge plan` and `kd2edge distill`: thin commands over kd2edge.distill.stage."""

from __future__ import annotations

from pathlib import Path

import click

from kd2edge.cli_common import config_option, emit, info, json_option, launch_options, profile_option, table
from kd2edge.data.prompts import TRAIN_METHODS

LOSSES = ("forward_kl", "reverse_kl", "jsd", "none")
DATA_METHODS = ("answer", "rationale", "critique-revision")   # as kd2edge.reasoning.generate (kept light here)


def _plan_summary(result: dict) -> str:
    from kd2edge.units import format_bytes

    chosen = result["choice"]["layers"]
    rows = [[("*" if c["layers"] == chosen else "") + str(c["layers"]), f"{c['params'] / 1e6:.1f}M",
             f"{c['param_fraction']:.2f}", format_bytes(c["size_bytes"]), format_bytes(c["kv_cache_bytes"]),
             f"{c['predicted_tokens_per_s']:.0f}", ", ".join(c["fails"]) or "fits"]
            for c in result["candidates"]]
    a, t = result["assumptions"], result["teacher"]
    head = (f"teacher {result['teacher_id']}: {t['params'] / 1e6:.1f}M parameters, {t['layers']} layers; "
            f"profile {result['profile']} ({a['bits']}-bit g{a['group_size']}, context {a['context_length']}, "
            f"{a['memory_bandwidth'] / 1e9:.1f} GB/s)")
    foot = f"choice: {chosen} layers ({result['choice']['params'] / 1e6:.1f}M parameters)"
    return "\n".join([head, table(rows, ["layers", "params", "share", "4-bit size", "KV cache", "tok/s", "budgets"]), foot])


@click.command()
@click.option("--teacher", default=None, help="Teacher: 'embedded', a hub id, a folder or a .gguf file.")
@profile_option
@config_option
@click.option("--max-param-fraction", type=float, default=None,
              help="Largest student share of the teacher's parameters. [default: 0.6]")
@json_option
def plan(teacher, profile, config_file, max_param_fraction, as_json):
    """List candidate students (teacher cut to fewer layers) with size, KV cache and predicted speed.

    The choice is the largest candidate that meets the profile's size, memory and
    decode-speed budgets; predicted tokens/s = memory bandwidth / (4-bit weights + KV cache).
    """
    from kd2edge.config import load_config
    from kd2edge.distill.plan import plan_student
    from kd2edge.models import resolve_model

    config = load_config(config_file, profile=profile,
                         overrides={"teacher": teacher, "distill.max_param_fraction": max_param_fraction})
    artifact = resolve_model(config.teacher)
    result = {"teacher_id": artifact.manifest.get("id", config.teacher), "profile": config.profile.name,
              **plan_student(artifact.path, config.profile, bits=config.quantize.bits,
                             group_size=config.quantize.group_size, vocab_size=config.distill.vocab_size,
                             intermediate_size=config.distill.intermediate_size,
                             max_param_fraction=config.distill.max_param_fraction,
                             student_layers=config.distill.student_layers)}
    emit(result, as_json, _plan_summary)


def _distill_summary(metrics: dict) -> str:
    s, t = metrics["student"], metrics["teacher"]
    lines = [f"student {s['layers']} layers, {s['params'] / 1e6:.1f}M parameters "
             f"({metrics['param_reduction']:.0%} fewer than the teacher's {t['params'] / 1e6:.1f}M)"]
    if s.get("layers_kept") is not None:
        lines.append(f"kept layers {s['layers_kept']}")
    if metrics.get("kd_loss_first") is not None:
        lines.append(f"KD loss {metrics['kd_loss_first']:.3f} -> {metrics['kd_loss_last']:.3f}")
    r = metrics.get("reasoning")
    if r:
        lines.append(f"{r['data_method']} data: kept {r['kept']} of {r['items']} teacher outputs "
                     f"(keep={r['keep']}), {r['pairs']} {r['train_method']} training pairs")
    g = metrics.get("grpo")
    if g:
        lines.append(f"GRPO {len(g)} steps: reward {g[0]['reward']:.3f} -> {g[-1]['reward']:.3f}, "
                     f"F1 after KD {metrics['grpo_info']['f1_after_kd']:.3f}")
    lines.append(f"validation F1 {metrics['f1_before']:.3f} -> {metrics['f1_after']:.3f}, "
                 f"EM {metrics['em_before']:.3f} -> {metrics['em_after']:.3f} (n={metrics['eval']['n']}"
                 f"{', asked as trained: ' + metrics['train_method'] if metrics.get('train_method', 'answer') != 'answer' else ''})")
    return "\n".join(lines)


@click.command()
@click.option("--teacher", default=None, help="Teacher: 'embedded', a hub id, a folder or a .gguf file.")
@profile_option
@config_option
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True, help="Output folder for the student.")
@click.option("--student", default=None, help="A hub id or folder sharing the teacher's tokenizer. [default: planned]")
@click.option("--steps", type=int, default=None, help="Optimizer steps.")
@click.option("--loss", type=click.Choice(LOSSES), default=None, help="Divergence to the teacher.")
@click.option("--temperature", type=float, default=None, help="Softmax temperature of the divergence.")
@click.option("--kd-ratio", type=float, default=None, help="Weight of the divergence (the rest: CE on the gold answer).")
@click.option("--data", default=None, help="Training data: 'embedded', a hub id, or a SQuAD JSON / JSONL file.")
@click.option("--shots", type=click.IntRange(0, 1), default=None, help="Zero- or one-shot training prompts. [default: 1]")
@click.option("--sequence-kd/--no-sequence-kd", default=None, help="Train on the teacher's own answers.")
@click.option("--data-method", type=click.Choice(DATA_METHODS), default=None,
              help="What the teacher writes to train on: 'answer' (gold answers, or the teacher's with "
                   "--sequence-kd), 'rationale' (a rationale then the answer), or 'critique-revision'. [default: answer]")
@click.option("--train-method", type=click.Choice(TRAIN_METHODS), default=None,
              help="What the student learns from rationale data: the answer, rationale-then-answer, or both as "
                   "two tasks (distilling step-by-step). [default: answer]")
@click.option("--keep", type=click.Choice(("correct", "all")), default=None,
              help="Teacher outputs trained on: right answers only, or every usable one. [default: correct]")
@click.option("--grpo-steps", type=click.IntRange(min=0), default=None,
              help="GRPO steps on correctness + format rewards after KD (needs --train-method rationale). [default: 0]")
@click.option("--teacher-cache", type=click.Path(file_okay=False), default=None,
              help="A folder for the teacher's cached top-k logits, shared across runs: the teacher runs once per "
                   "teacher, data and vocabulary, and every student trained from the same ones reuses its file. "
                   "[default: the stage's work folder]")
@click.option("--seed", type=int, default=None)
@click.option("--force", is_flag=True, help="Rerun even if the output is up to date.")
@launch_options
@json_option
def distill(teacher, profile, config_file, out, student, steps, loss, temperature, kd_ratio, data, shots,
            sequence_kd, data_method, train_method, keep, grpo_steps, teacher_cache, seed, force, num_processes,
            num_machines, machine_rank, main_process_ip, main_process_port, accelerate_config, as_json):
    """Distill a student from a teacher (resumable: rerun the same command after a stop).

    With --num-processes N the stage runs in N processes started through accelerate's launcher
    (as `accelerate launch --multi_gpu --num_processes N -m kd2edge.cli distill ...` would): the
    data is split between them, the main one writes the output, and this command prints it.
    """
    from kd2edge.config import load_config
    from kd2edge.distributed import launch_spec
    from kd2edge.errors import ConfigError
    from kd2edge.models import resolve_model
    from kd2edge.pipeline import run_launched_stage, run_stage

    overrides = {"teacher": teacher, "data": data, "seed": seed, "distill.student": student, "distill.steps": steps,
                 "distill.loss": loss, "distill.temperature": temperature, "distill.kd_ratio": kd_ratio,
                 "distill.shots": shots, "distill.sequence_kd": sequence_kd, "distill.data_method": data_method,
                 "distill.train_method": train_method, "distill.keep": keep, "distill.grpo_steps": grpo_steps,
                 "distill.teacher_cache": teacher_cache}
    config = load_config(config_file, profile=profile, overrides=overrides)
    if kd_ratio is not None and config.distill.loss == "none":
        # The config cannot tell a default kd_ratio from a chosen one; the flag can.
        raise ConfigError(f"--kd-ratio {kd_ratio} weighs the divergence, which loss 'none' turns off: "
                          "drop --kd-ratio, or choose a --loss (forward_kl, reverse_kl, jsd)")
    spec = launch_spec(num_processes, num_machines, machine_rank, main_process_ip, main_process_port, accelerate_config)
    info(f"distill: teacher {config.teacher}, profile {config.profile.name}, output {out}"
         + (f", {spec.num_processes} processes on {spec.num_machines} machine(s)" if spec else ""))
    if spec is None:
        result = run_stage("distill", config, resolve_model(config.teacher), Path(out), force=force)
    else:
        result = run_launched_stage("distill", config, resolve_model(config.teacher), Path(out), spec, force=force)
    info(f"distill: {result.status} in {result.seconds:.0f} s")
    metrics = result.artifact.metrics
    emit({"status": result.status, "path": str(result.artifact.path), **metrics}, as_json,
         lambda _: _distill_summary(metrics))
