"""The distill stage: teacher artifact -> a smaller student trained on the teacher's outputs.

Order of work (cheap checks first, so bad input fails in seconds):
1. plan the student (or resolve `--student` and check its tokenizer and size);
2. load and tokenize the training split (DataError if nothing usable);
3. load the teacher, build the student (block-influence layer pruning), score it before training;
4. cache the teacher's answer-position logits (and, with sequence KD, its answers) in the work dir;
5. train (resuming from the work dir's checkpoint), score again, save, check the saved copy reloads.

Issue #9 (kd2edge.reasoning), with `data_method` other than "answer": right after the
teacher loads, it writes "Rationale: ... Answer: ..." (or draft -> critique -> revision)
for the training items, filtered by correctness (cached in the work dir, copied to
teacher_data.jsonl); `train_method` turns the kept records into (prompt, target) pairs
(answer, rationale-then-answer, or both as two tasks with lambda = 1) and the KD losses
apply unchanged on the target tokens. With `grpo_steps`, GRPO on correctness + format
rewards follows KD. The student is scored as it will be asked (`eval_prompt`).
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
import time
from pathlib import Path

from kd2edge.artifacts import Artifact, work_dir, write_artifact
from kd2edge.config import RunConfig
from kd2edge.errors import ArtifactError, ConfigError, DataError, ModelError, StageError

CALIBRATION_ITEMS = 32   # prompts used to measure block influence
TEACHER_MAX_NEW_TOKENS = 160   # rationale (or draft/critique/revision) length limit, as `kd2edge generate-data`
MIN_ANSWER_SCORE = 0.5   # a teacher answer counts as right at F1 / Rouge-L >= this (choice: exact)
TEACHER_RECORDS = "teacher_records.jsonl"
GRPO_WEIGHTS = {"correctness": 1.0, "format": 0.2}
GRPO_GENERATIONS, GRPO_MAX_NEW_TOKENS, GRPO_LR = 4, 64, 1e-6


def train_item_limit(d) -> int | None:
    """Training items read: what `steps` x `grad_accum` x `batch_size` consume (one epoch), at most
    `train_limit`; with 0 steps, `train_limit` (None: the whole split)."""
    micro_batches = d.steps * d.grad_accum
    if not micro_batches:
        return d.train_limit
    return min(x for x in (d.train_limit, micro_batches * d.batch_size) if x is not None)


def plan_for(config: RunConfig, teacher_path: Path) -> dict:
    """Candidate layer-pruned students for the config's profile, and the choice.

    Returns:
        {"teacher": {params, layers}, "candidates": [...], "choice": {...}, "assumptions": {...}}

    Raises:
        BudgetError: no candidate fits the profile.
        ModelError: the teacher's config cannot be read.
    """
    from transformers import AutoConfig

    from kd2edge.distill.plan import candidates, choose, param_breakdown

    try:
        model_config = AutoConfig.from_pretrained(teacher_path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the teacher's config in {teacher_path}: {str(e).splitlines()[0]}") from None
    profile, d = config.profile, config.distill
    breakdown = param_breakdown(model_config)
    kv_bytes = 2 if profile.hardware.accelerator not in ("", "none") else 4
    cands = candidates(breakdown, bits=config.quantize.bits, group_size=config.quantize.group_size,
                       context_length=profile.runtime.context_length, bandwidth=float(profile.hardware.memory_bandwidth),
                       kv_value_bytes=kv_bytes, max_artifact_mb=profile.budgets.max_artifact_mb,
                       max_peak_memory_mb=profile.budgets.max_peak_memory_mb,
                       min_decode_tokens_per_s=profile.budgets.min_decode_tokens_per_s,
                       max_param_fraction=d.max_param_fraction)
    choice = choose(cands, f"profile {profile.name}")
    if d.student_layers is not None:
        if d.student_layers >= breakdown.layers:
            raise ConfigError(f"distill.student_layers: {d.student_layers} is not fewer than the teacher's "
                              f"{breakdown.layers} layers; choose at most {breakdown.layers - 1}")
        choice = cands[d.student_layers - 1]
    return {"teacher": {"params": breakdown.total, "layers": breakdown.layers},
            "candidates": [c.to_dict() for c in cands], "choice": choice.to_dict(),
            "assumptions": {"bits": config.quantize.bits, "group_size": config.quantize.group_size,
                            "context_length": profile.runtime.context_length, "kv_value_bytes": kv_bytes,
                            "memory_bandwidth": float(profile.hardware.memory_bandwidth),
                            "max_param_fraction": d.max_param_fraction}}


def _external_student(spec: str, teacher_tokenizer, teacher_params: int, teacher_id: str):
    """Resolve and load `--student`, checking tokenizer and size before any training.

    Raises:
        ModelError: a different tokenizer, or a student not smaller than the teacher.
    """
    from transformers import AutoTokenizer

    from kd2edge.distill.student import check_same_tokenizer
    from kd2edge.models import count_params, load_causal_lm, resolve_model

    artifact = resolve_model(spec)
    check_same_tokenizer(teacher_tokenizer, AutoTokenizer.from_pretrained(artifact.path), teacher_id, spec)
    model, _ = load_causal_lm(artifact.path)
    params = count_params(model)
    if params >= teacher_params:
        raise ModelError(f"student {spec} has {params:,} parameters, not fewer than the teacher's {teacher_params:,}: "
                         "choose a smaller student (or omit --student to plan one)")
    return model, artifact


def _score(model, tokenizer, evalset, max_new_tokens: int, desc: str, method: str = "answer") -> dict:
    """EM/F1 of `model` on the evaluation prompts (greedy), as the evaluate stage scores a student
    trained with `method` (asked with `eval_prompt`, read with `read_answer`)."""
    from kd2edge.evaluate.evaluator import TorchBackend, summarize
    from kd2edge.reasoning.evaluation import run_method_items

    records = run_method_items(TorchBackend(model, tokenizer), evalset, method, max_new_tokens, mode="generate",
                               desc=desc)
    summary = summarize(records, evalset.task)
    return {"em": round(summary["em"], 4), "f1": round(summary["f1"], 4), "n": summary["n"]}


def _cached(path: Path, compute):
    """A JSON result kept in the work dir, so a resumed run does not recompute it."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    path.write_text(json.dumps(value), encoding="utf-8")
    return value


def teacher_records(teacher, tokenizer, items, method: str, keep: str, cache: Path, batch_size: int,
                    progress: bool = True) -> list:
    """The teacher's rationale records for `items`, generated once and kept in `cache` (the work dir).

    A resumed run (same config: the pipeline clears the work dir when the config changes)
    reads them back instead of generating again.

    Returns:
        One `kd2edge.reasoning.generate.TeacherRecord` per item, in order.

    Raises:
        DataError: critique-revision on items without gold answers.
    """
    from kd2edge.reasoning.generate import read_records, records_from_teacher, write_jsonl_atomic

    if cache.is_file():
        records = read_records(cache)
        if [r.id for r in records] == [it.id for it in items] and all(r.method == method for r in records):
            return records
    records = records_from_teacher(teacher, tokenizer, items, method, keep, MIN_ANSWER_SCORE, TEACHER_MAX_NEW_TOKENS,
                                   batch_size, progress)
    write_jsonl_atomic(cache, (r.to_json() for r in records))
    return records


def grpo_after_kd(student, tokenizer, items, work: Path, steps: int, seed: int) -> tuple[object, dict]:
    """GRPO on the KD student (`kd2edge.reasoning.grpo.run_grpo`), resumable through the work dir.

    The KD student is saved to work/kd_student and GRPO writes work/grpo; a resumed run
    whose GRPO already finished reads that folder back.

    Returns:
        (the GRPO-trained student, loaded in fp32 on the CPU, in eval mode; run_grpo's result).
    """
    from kd2edge.models import load_causal_lm
    from kd2edge.reasoning.grpo import run_grpo

    out = work / "grpo"
    try:
        result = {**Artifact.load(out, stage="grpo").metrics, "out_dir": str(out)}
    except ArtifactError:   # not run yet, or interrupted: GRPO writes its folder atomically
        kd_dir = work / "kd_student"
        student.save_pretrained(kd_dir, safe_serialization=True)
        tokenizer.save_pretrained(kd_dir)
        result = run_grpo(kd_dir, items, out, steps=steps, reward_weights=GRPO_WEIGHTS,
                          num_generations=GRPO_GENERATIONS, max_new_tokens=GRPO_MAX_NEW_TOKENS, lr=GRPO_LR, seed=seed)
    model, _ = load_causal_lm(out)
    return model, result


def write_loss_curves(history: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """loss_history.csv and loss_curve.png (total, KD and CE loss per optimizer step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path, png_path = out_dir / "loss_history.csv", out_dir / "loss_curve.png"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "kd", "ce", "lr", "grad_norm"])
        writer.writeheader()
        writer.writerows(history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in history]
    for key, label in (("loss", "total"), ("kd", "KD divergence"), ("ce", "CE on gold")):
        ax.plot(steps, [r[key] for r in history], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("distillation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return csv_path, png_path


def _reload_diff(model, folder: Path, example_ids: tuple[int, ...]) -> float:
    """Max |logit difference| between the in-memory student and the folder it was saved to."""
    import torch

    from kd2edge.models import load_causal_lm

    reloaded, _ = load_causal_lm(folder)
    ids = torch.tensor([example_ids])
    with torch.inference_mode():
        return float((model(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max())


def run(config: RunConfig, input_artifact: Artifact, out_dir: Path) -> Artifact:
    """Distill a student from the teacher artifact into `out_dir` (a transformers folder + manifest).

    Raises:
        ConfigError, ModelError, DataError, BudgetError: bad input, before any long work.
        StageError: the saved student does not reproduce the trained one.
    """
    import torch
    from transformers import AutoTokenizer

    from kd2edge.data.loaders import load_qa
    from kd2edge.data.prompts import target_text
    from kd2edge.distill import data as ddata
    from kd2edge.distill.student import (choose_layers, measure_block_influence, prune_layers,
                                         real_vocab_size)
    from kd2edge.distill.train import collate, train_student
    from kd2edge.evaluate.evaluator import prepare
    from kd2edge.models import count_params, load_causal_lm
    from kd2edge.reasoning.generate import summarize as summarize_records
    from kd2edge.reasoning.generate import write_jsonl_atomic
    from kd2edge.reasoning.methods import build_pairs

    d, out_dir = config.distill, Path(out_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    work = work_dir(out_dir)
    teacher_path = Path(input_artifact.path)
    teacher_id = input_artifact.manifest.get("id", str(teacher_path))
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # With --student there is nothing to plan: a teacher no planned student fits (BudgetError) is fine.
    plan = None if d.student else plan_for(config, teacher_path)

    # Data before models: an unusable dataset fails in seconds.
    train_set = load_qa(config.data, "train", train_item_limit(d), config.seed)
    items = [it for it in train_set.items if it.gold]
    prompts = ddata.build_prompts(items, train_set.items, d.shots, config.seed)
    if d.data_method == "answer":
        examples, skipped = ddata.build_examples(tokenizer, items, prompts, [target_text(it) for it in items],
                                                 d.max_length)
    elif not items:
        raise DataError(f"{config.data} has no training item with a gold answer: choose a labelled dataset")
    evalset = prepare(config.evaluate.data or config.data, config.evaluate.split, config.evaluate.shots,
                      d.eval_limit, config.seed)
    timings["data_s"] = round(time.perf_counter() - t0, 3)

    teacher, _ = load_causal_lm(teacher_path)
    reasoning = None
    if d.data_method != "answer":
        # The teacher writes the targets; a dataset where it writes no usable one fails here, before training.
        t = time.perf_counter()
        records = teacher_records(teacher, tokenizer, items, d.data_method, d.keep, work / TEACHER_RECORDS,
                                  d.batch_size)
        write_jsonl_atomic(out_dir / "teacher_data.jsonl", (r.to_json() for r in records))
        prompt_of = {it.id: p for it, p in zip(items, prompts)}
        pairs = build_pairs(records, d.train_method, prompt_fn=lambda item: prompt_of[item.id])
        examples, skipped = ddata.build_examples(tokenizer, [p.item for p in pairs], [p.prompt for p in pairs],
                                                 [p.target for p in pairs], d.max_length)
        reasoning = {"data_method": d.data_method, "train_method": d.train_method, "keep": d.keep,
                     "min_score": MIN_ANSWER_SCORE, "teacher_data": "teacher_data.jsonl",
                     **summarize_records(records), "pairs": len(pairs),
                     "pairs_by_task": {task: sum(p.task == task for p in pairs) for task in ("answer", "rationale")
                                       if any(p.task == task for p in pairs)}}
        timings["teacher_rationales_s"] = round(time.perf_counter() - t, 3)
    teacher_params = count_params(teacher)
    if d.student:
        student, student_artifact = _external_student(d.student, tokenizer, teacher_params, teacher_id)
        student_id, kept, importance = student_artifact.manifest.get("id", d.student), None, None
    else:
        t = time.perf_counter()
        calib = [examples[i].input_ids for i in range(min(CALIBRATION_ITEMS, len(examples)))]
        batches = [collate([ddata.TrainExample(ids, ids) for ids in calib[i:i + 8]], tokenizer.pad_token_id)
                   for i in range(0, len(calib), 8)]
        importance = [round(x, 6) for x in measure_block_influence(teacher, batches)]
        kept = choose_layers(importance, plan["choice"]["layers"])
        student = prune_layers(copy.deepcopy(teacher), kept)
        student_id = f"{teacher_id} [layers {','.join(map(str, kept))}]"
        timings["block_influence_s"] = round(time.perf_counter() - t, 3)
    vocab = real_vocab_size(tokenizer, teacher, student)

    if d.sequence_kd:
        t = time.perf_counter()
        targets = ddata.teacher_answers(teacher, tokenizer, items, prompts, work / ddata.SEQKD_CACHE,
                                        max_new_tokens=config.evaluate.max_new_tokens)
        examples, skipped = ddata.build_examples(tokenizer, items, prompts, targets, d.max_length)
        timings["teacher_answers_s"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    cache = None  # loss "none" (plain fine-tuning) and steps = 0 never read the teacher's logits
    if d.loss != "none" and d.steps > 0:
        cache = ddata.cached_teacher_logits(work / ddata.TEACHER_CACHE, teacher, examples, vocab_size=vocab,
                                            topk=d.topk_logits, pad_id=tokenizer.pad_token_id)
    timings["teacher_logits_s"] = round(time.perf_counter() - t, 3)
    del teacher

    t = time.perf_counter()
    method = d.train_method
    before = _cached(work / "score_before.json",
                     lambda: _score(student, tokenizer, evalset, config.evaluate.max_new_tokens, "student before",
                                    method))
    timings["eval_before_s"] = round(time.perf_counter() - t, 3)

    torch.manual_seed(config.seed)
    result = train_student(student, examples, cache, vocab_size=vocab, pad_id=tokenizer.pad_token_id,
                           loss=d.loss, temperature=d.temperature, kd_ratio=d.kd_ratio, beta=d.jsd_beta,
                           steps=d.steps, batch_size=d.batch_size, grad_accum=d.grad_accum, lr=d.lr,
                           warmup_ratio=d.warmup_ratio, max_grad_norm=d.max_grad_norm, seed=config.seed,
                           work_dir=work, checkpoint_every=d.checkpoint_every, mixed_precision=d.mixed_precision)
    timings["train_s"] = round(result.seconds, 3)

    grpo = None
    if d.grpo_steps:
        t = time.perf_counter()
        after_kd = _cached(work / "score_after_kd.json",
                           lambda: _score(student, tokenizer, evalset, config.evaluate.max_new_tokens,
                                          "student after KD", method))
        student, grpo = grpo_after_kd(student, tokenizer, items, work, d.grpo_steps, config.seed)
        if grpo.get("plot"):
            shutil.copy2(Path(grpo["out_dir"]) / grpo["plot"], out_dir / grpo["plot"])
        grpo_info = {"weights": grpo["weights"], "warnings": grpo["warnings"], "plot": grpo.get("plot"),
                     "num_generations": GRPO_GENERATIONS, "max_new_tokens": GRPO_MAX_NEW_TOKENS, "lr": GRPO_LR,
                     "reload_max_abs_diff": grpo["reload_max_abs_diff"], "seconds": grpo["seconds"],
                     "f1_after_kd": after_kd["f1"], "em_after_kd": after_kd["em"]}
        timings["grpo_s"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    after = _score(student, tokenizer, evalset, config.evaluate.max_new_tokens, "student after", method)
    timings["eval_after_s"] = round(time.perf_counter() - t, 3)

    student.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    diff = _reload_diff(student, out_dir, examples[0].input_ids)
    if diff > 1e-4:
        raise StageError(f"the saved student differs from the trained one (max |logit diff| {diff:.2e}): "
                         "check free disk and rerun with --force")
    history = result.history
    csv_path, png_path = write_loss_curves(history, out_dir) if history else (None, None)
    student_params = count_params(student)
    train_tokens = result.tokens
    metrics = {
        "teacher": {"id": teacher_id, "params": teacher_params},
        "student": {"id": student_id, "params": student_params, "layers": student.config.num_hidden_layers,
                    "layers_kept": kept, "importance": importance},
        "param_reduction": round(1 - student_params / teacher_params, 4),
        "plan": {"choice": plan["choice"], "assumptions": plan["assumptions"]} if plan else None,
        "loss": d.loss, "temperature": d.temperature, "kd_ratio": d.kd_ratio,
        "loss_history": csv_path.name if csv_path else None,
        "loss_curve": png_path.name if png_path else None,
        "kd_loss_first": history[0]["kd"] if history else None,
        "kd_loss_last": history[-1]["kd"] if history else None,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "f1_before": before["f1"], "f1_after": after["f1"], "em_before": before["em"], "em_after": after["em"],
        "eval": {"data": config.evaluate.data or config.data, "split": config.evaluate.split,
                 "shots": config.evaluate.shots, "n": after["n"]},
        "train": {"items": len(examples), "skipped": skipped, "steps": d.steps, "resumed_from": result.resumed_from,
                  "tokens": train_tokens, "answer_tokens": result.answer_tokens,
                  "tokens_per_s": round(train_tokens / result.seconds, 1) if result.seconds else None,
                  "mixed_precision": result.mixed_precision, "topk_logits": d.topk_logits,
                  "sequence_kd": d.sequence_kd, "shots": d.shots},
        "reload_max_abs_diff": diff,
        # How the evaluate stage must ask this student (kd2edge.reasoning.methods.eval_prompt).
        "train_method": method,
    }
    if reasoning is not None:
        metrics["reasoning"] = reasoning
    if grpo is not None:
        metrics["grpo"] = grpo["steps"]
        metrics["grpo_info"] = grpo_info
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    return write_artifact(out_dir, "distill", config.stage_config("distill"), input_artifact, metrics,
                          id=student_id, kind="model", timings=timings)


# ----------------------------------------------------------------------------------------------
# Resource estimate (kd2edge.pipeline.run_stage checks it against free disk and memory first).

def activation_bytes(seq: int, batch: int, hidden: int, layers: int) -> int:
    """Activations a transformer keeps for the backward pass, in fp32.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"):
    s b h (34 + 5 a s / h) bytes per layer in 16-bit precision; twice that in fp32. The 5 a s / h
    term is the (s, s) attention scores, which PyTorch's scaled-dot-product attention (the
    transformers default) never stores, so it is left out.
    """
    return 2 * 34 * layers * seq * batch * hidden


ANSWER_POSITIONS = 64   # logits are computed at answer positions only (gold answers are short)


def distill_needs(teacher_params: int, student_params: int, seq: int, batch: int, hidden: int, layers: int,
                  vocab: int, cached_positions: int, topk: int):
    """Disk and peak memory of distilling one student (bytes), an upper bound.

    Memory, the larger of two phases: building the student holds the teacher in fp32 and the
    copy of it that is pruned into the student (8 B per teacher param); training (the teacher is
    released by then) holds the student's fp32 weights, gradients and AdamW's two moments (16 B
    per student param), its activations for a full batch at max_length (`activation_bytes`) and
    the logits at up to ANSWER_POSITIONS answer positions per row, with their log-softmax and
    gradient, fp32. Disk: the saved student (4 B/param), the resumable checkpoint (weights +
    AdamW moments, 12 B/param), and the teacher's cached logits, top-k values fp32 + indices
    int32 per position (or the full vocabulary in fp16 with topk 0).

    Returns:
        kd2edge.resources.Needs.
    """
    from kd2edge.resources import Needs

    logits = 3 * 4 * batch * min(seq, ANSWER_POSITIONS) * vocab
    training = 16 * student_params + activation_bytes(seq, batch, hidden, layers) + logits
    cache = cached_positions * (8 * topk if topk else 2 * vocab)
    return Needs(disk_bytes=16 * student_params + cache, memory_bytes=max(8 * teacher_params, training))


def estimate(config: RunConfig, input_artifact: Artifact):
    """What distilling from `input_artifact` with the run's [distill] settings needs (see distill_needs).

    The student is counted at the planned share of the teacher (`max_param_fraction`), or as large
    as the teacher with --student (it must be smaller); it has at most the teacher's layers; every
    training item is counted at max_length.
    """
    from kd2edge.quant.stage import hidden_size, model_dims, stored_weights

    d = config.distill
    teacher, _ = stored_weights(Path(input_artifact.path))
    dims = model_dims(Path(input_artifact.path))
    student = teacher if d.student else int(teacher * d.max_param_fraction)
    items = train_item_limit(d) or 0
    return distill_needs(teacher, student, d.max_length, d.batch_size, hidden_size(dims),
                         dims.get("num_hidden_layers") or 0, dims.get("vocab_size") or 0, items * d.max_length,
                         d.topk_logits)
