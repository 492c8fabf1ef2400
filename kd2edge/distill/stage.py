"""The distill stage: teacher artifact -> a smaller student trained on the teacher's outputs.

The steps, cheap checks first so that bad input fails in seconds:
1. plan the student for the profile (`plan.plan_student`), unless `--student` names one;
2. the training examples (`data`): gold answers, or with `data_method` "rationale" /
   "critique-revision" the teacher's filtered rationales (`kd2edge.reasoning`), and the
   evaluation prompts the student is scored on;
3. build the student (`student`): the teacher's most influential layers, or `--student`;
4. the teacher's targets: with sequence-level KD its own answers, then its top-k logits at
   every answer position, both cached in the work dir so a resumed run reuses them;
5. train (`train.train_student`, resuming from the work dir's checkpoint), GRPO after KD
   when asked (`kd2edge.reasoning.grpo`), scored before and after as the evaluate stage
   will ask it (`kd2edge.scoring.methods`);
6. save the student, check that the saved copy reproduces it, plot the losses, write the manifest.

Launched in several processes (`kd2edge.distributed`), every process runs steps 1-5 alike
(the teacher's logits pass split between them, the training as DDP); the main process alone
scores, saves and writes the manifest, and the others return None: `kd2edge.pipeline.run_stage`
commits the folder. What runs in one process only (rationale data, GRPO) is refused up front.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kd2edge.artifacts import Artifact, Stopwatch, cached_json, work_dir, write_artifact
from kd2edge.config import RunConfig
from kd2edge.distributed import Ranks, ranks, use_cpu
from kd2edge.errors import ConfigError, StageError


def run(config: RunConfig, input_artifact: Artifact, out_dir: Path) -> Artifact | None:
    """Distill a student from the teacher artifact into `out_dir` (a transformers folder + manifest).

    Returns:
        The artifact; None in a launched process other than the main one (it writes nothing to `out_dir`).

    Raises:
        ConfigError, ModelError, DataError, BudgetError: bad input, before any long work.
        StageError: the saved student does not reproduce the trained one.
    """
    import torch

    from kd2edge.distill import data
    from kd2edge.distill.student import build_student
    from kd2edge.distill.train import resolve_mixed_precision, train_student
    from kd2edge.models import load_causal_lm, load_tokenizer
    from kd2edge.scoring.evaluator import prepare

    d, ev, out_dir, work, clock = config.distill, config.evaluate, Path(out_dir), work_dir(out_dir), Stopwatch()
    group = ranks()
    _check_processes(d, group)
    teacher_path = Path(input_artifact.path)
    teacher_id, tokenizer = input_artifact.manifest.get("id", str(teacher_path)), load_tokenizer(teacher_path)
    plan = _plan(config, teacher_path)
    with clock("data_s"):   # data before models: an unusable dataset fails in seconds
        # batch_size is per process: W processes read W times the items of one (one epoch).
        limit = data.train_item_limit(d.steps, d.grad_accum, d.batch_size * group.world, d.train_limit)
        items, prompts, split = data.training_items(config.data, limit, d.shots, config.seed)
        evalset = prepare(ev.data or config.data, ev.split, ev.shots, d.eval_limit, config.seed)
        vocab = data.student_vocabulary(tokenizer, items, prompts, None if d.student else d.vocab_size,
                                        held_out=[p.text for p in evalset.prompts])
        examples, skipped = data.answer_examples(vocab.tokenizer, items, prompts, d.max_length)
    teacher, reasoning = load_causal_lm(teacher_path)[0], None
    if d.data_method != "answer":
        with clock("teacher_rationales_s"):
            examples, skipped, reasoning = data.rationale_examples(
                teacher, tokenizer, vocab.tokenizer, items, prompts, data_method=d.data_method,
                train_method=d.train_method, keep=d.keep, max_length=d.max_length, batch_size=d.batch_size,
                cache=work / data.TEACHER_RECORDS, out=out_dir / "teacher_data.jsonl")
    with clock("block_influence_s"):
        student, student_tokenizer, built = build_student(
            teacher, tokenizer, teacher_id, vocab.teacher_ids(examples), layers=plan["choice"]["layers"] if plan else None,
            spec=d.student, keep_ids=vocab.old_ids, intermediate_size=d.intermediate_size)
    with clock("teacher_targets_s"):
        examples, skipped, cache, cache_info = data.teacher_targets(
            teacher, tokenizer, student_tokenizer, items, prompts, examples, skipped, work, sequence_kd=d.sequence_kd,
            logits=d.loss != "none" and d.steps > 0, vocab_size=built["vocab"], topk=d.topk_logits,
            kd_positions=d.kd_positions, old_ids=vocab.old_ids, max_length=d.max_length,
            max_new_tokens=ev.max_new_tokens, teacher_hash=input_artifact.content_hash,
            cache_dir=Path(d.teacher_cache) if d.teacher_cache else None, group=group,
            bf16=resolve_mixed_precision(d.mixed_precision) == "bf16")
    del teacher
    with clock("eval_before_s"):   # the other processes wait for the main one in the training's first step
        before = cached_json(work / "score_before.json",
                             lambda: _score(student, student_tokenizer, evalset, d, ev, "before")) if group.is_main else None
    torch.manual_seed(config.seed)
    result = train_student(student, examples, cache, vocab_size=built["vocab"], pad_id=student_tokenizer.pad_token_id,
                           loss=d.loss, temperature=d.temperature, kd_ratio=d.kd_ratio, beta=d.jsd_beta, steps=d.steps,
                           batch_size=d.batch_size, grad_accum=d.grad_accum, lr=d.lr, warmup_ratio=d.warmup_ratio,
                           max_grad_norm=d.max_grad_norm, seed=config.seed, work_dir=work,
                           checkpoint_every=d.checkpoint_every, mixed_precision=d.mixed_precision,
                           kd_positions=d.kd_positions)
    clock.timings["train_s"] = round(result.seconds, 3)
    if not group.is_main:
        return None
    with clock("grpo_s"):
        student, grpo = _grpo(student, student_tokenizer, items, evalset, d, ev, work, config.seed, out_dir)
    with clock("eval_after_s"):
        after = _score(student, student_tokenizer, evalset, d, ev, "after")
    reload_diff = _save(student, student_tokenizer, out_dir, examples[0].input_ids, vocab)
    metrics = _metrics(config, student, built, plan, result, before, after, examples, skipped, reasoning, grpo,
                       reload_diff, teacher_id, out_dir, split, vocab.info)
    metrics["distributed"] = _distributed(d, group, result, cache_info)
    return write_artifact(out_dir, "distill", config.stage_config("distill"), input_artifact, metrics,
                          id=built["id"], kind="model", timings=clock.total(), warnings=result.warnings)


def _check_processes(d, group: Ranks) -> None:
    """Refuse, before any long work, what does not run in several processes.

    Raises:
        ConfigError: rationale data, GRPO or an FSDP launch on GPUs with more than one process.
    """
    from kd2edge.distill.train import FSDP_REFUSED, fsdp_requested

    if group.world == 1:
        return
    problems = []
    if d.data_method != "answer":
        problems.append(f"data_method {d.data_method!r}: the teacher writes its rationales in one process; "
                        "run this distill without --num-processes")
    if d.grpo_steps:
        problems.append("grpo_steps: GRPO after KD runs in one process; distill with --grpo-steps 0 in several, "
                        "then run `kd2edge grpo` on the student")
    if fsdp_requested() and not use_cpu():
        problems.append(FSDP_REFUSED)
    if problems:
        raise ConfigError(problems, source=f"{group.world} processes")


def _distributed(d, group: Ranks, result, cache_info: dict | None) -> dict:
    """The manifest's `distributed`: processes, backend, global batch, each process's share, the
    teacher-logit cache (where, reused or computed by how many processes)."""
    cache = dict(cache_info, folder=d.teacher_cache) if cache_info else None
    return {"num_processes": group.world, "backend": group.backend, "global_batch": d.batch_size * d.grad_accum * group.world,
            "per_process": result.per_process, "teacher_cache": cache}


def _plan(config, teacher_path: Path) -> dict | None:
    """The planned student for the profile; None with --student (a teacher no planned student fits is fine then)."""
    from kd2edge.distill.plan import plan_student

    d = config.distill
    if d.student:
        return None
    return plan_student(teacher_path, config.profile, bits=config.quantize.bits, group_size=config.quantize.group_size,
                        vocab_size=d.vocab_size, intermediate_size=d.intermediate_size,
                        max_param_fraction=d.max_param_fraction, student_layers=d.student_layers)


def _score(model, tokenizer, evalset, d, ev, when: str) -> dict:
    """EM/F1 of the student (greedy), asked as the evaluate stage will ask it (its `train_method`)."""
    from kd2edge.scoring.backends import TorchBackend
    from kd2edge.scoring.methods import method_scores

    return method_scores(TorchBackend(model, tokenizer), evalset, d.train_method, ev.max_new_tokens,
                         f"student {when}")


def _grpo(student, tokenizer, items, evalset, d, ev, work: Path, seed: int, out_dir: Path):
    """GRPO after KD when asked (`grpo_steps`), with the KD student's scores and the reward plot kept
    beside the student; (the student, the GRPO result or None)."""
    from kd2edge.reasoning.grpo import grpo_after_kd

    if not d.grpo_steps:
        return student, None
    after_kd = cached_json(work / "score_after_kd.json", lambda: _score(student, tokenizer, evalset, d, ev, "after KD"))
    student, grpo = grpo_after_kd(student, tokenizer, items, work, d.grpo_steps, seed)
    if grpo.get("plot"):
        shutil.copy2(Path(grpo["out_dir"]) / grpo["plot"], out_dir / grpo["plot"])
    grpo["info"].update(f1_after_kd=after_kd["f1"], em_after_kd=after_kd["em"])
    return student, grpo


def _save(student, tokenizer, out_dir: Path, probe_ids, vocab) -> float:
    """Save the student (with `vocab_trim.json`, the teacher id of each token, when its vocabulary was
    trimmed) and return how far the saved copy's logits are from it (must be ~0).

    Raises:
        StageError: the saved copy does not reproduce the trained student.
    """
    from kd2edge.artifacts import write_json_atomic
    from kd2edge.models import reload_max_abs_diff

    student.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if vocab.old_ids is not None:
        write_json_atomic(out_dir / "vocab_trim.json", {"old_ids": vocab.old_ids, "old_vocab_size": vocab.old_size})
    diff = reload_max_abs_diff(student, out_dir, probe_ids)
    if diff > 1e-4:
        raise StageError(f"the saved student differs from the trained one (max |logit diff| {diff:.2e}): "
                         "check free disk and rerun with --force")
    return diff


def _metrics(config, student, built: dict, plan: dict | None, result, before: dict, after: dict, examples: list,
             skipped: int, reasoning: dict | None, grpo: dict | None, reload_diff: float, teacher_id: str,
             out_dir: Path, split: dict, vocabulary: dict) -> dict:
    """The distill manifest's metrics (the keys report.json reads: docs/ARCHITECTURE.md)."""
    from kd2edge.distill.plots import write_loss_curves
    from kd2edge.models import count_params

    d, ev, history = config.distill, config.evaluate, result.history
    csv_path, png_path = write_loss_curves(history, out_dir) if history else (None, None)
    student_params, teacher_params = count_params(student), built["teacher_params"]
    first, last = (history[0], history[-1]) if history else ({}, {})
    metrics = {
        "teacher": {"id": teacher_id, "params": teacher_params},
        "student": {"id": built["id"], "params": student_params, "layers": student.config.num_hidden_layers,
                    "layers_kept": built["layers_kept"], "importance": built["importance"],
                    "vocabulary": vocabulary},
        "param_reduction": round(1 - student_params / teacher_params, 4),
        "plan": {"choice": plan["choice"], "assumptions": plan["assumptions"]} if plan else None,
        "loss": d.loss, "temperature": d.temperature, "kd_ratio": d.kd_ratio,
        "loss_history": csv_path.name if csv_path else None,
        "loss_curve": png_path.name if png_path else None,
        "kd_loss_first": first.get("kd"), "kd_loss_last": last.get("kd"),
        "loss_first": first.get("loss"), "loss_last": last.get("loss"),
        "f1_before": before["f1"], "f1_after": after["f1"], "em_before": before["em"], "em_after": after["em"],
        "eval": {"data": ev.data or config.data, "split": ev.split, "shots": ev.shots, "n": after["n"]},
        "train": {"data": config.data, "split": split, "items": len(examples), "skipped": skipped, "steps": d.steps,
                  "resumed_from": result.resumed_from, "tokens": result.tokens, "answer_tokens": result.answer_tokens,
                  "kd_positions": d.kd_positions,
                  "tokens_per_s": round(result.tokens / result.seconds, 1) if result.seconds else None,
                  "mixed_precision": result.mixed_precision, "topk_logits": d.topk_logits,
                  "sequence_kd": d.sequence_kd, "shots": d.shots},
        "reload_max_abs_diff": reload_diff,
        # How the evaluate stage must ask this student (kd2edge.data.prompts.eval_prompt).
        "train_method": d.train_method,
    }
    if reasoning is not None:
        metrics["reasoning"] = reasoning
    if grpo is not None:
        metrics["grpo"], metrics["grpo_info"] = grpo["steps"], grpo["info"]
    return metrics


def estimate(config: RunConfig, input_artifact: Artifact):
    """What distilling from `input_artifact` with the run's [distill] settings needs (`needs.estimate`)."""
    from kd2edge.distill.needs import estimate as distill_estimate

    return distill_estimate(config.distill, Path(input_artifact.path))
