"""The evaluate stage: teacher, student and deployed model on the same items, and retention.

Input: the export artifact. Its lineage (export <- quantize <- distill <- teacher) gives the
student (the distill output, run in PyTorch fp32) and the teacher (the distill stage's
input). All three answer the same items with the same prompts; the deployed model runs
through `kd2edge.runtime.OnnxLM` as it would on the device. The teacher's scores are
cached (teacher hash + data + prompt settings) so a rerun of the pipeline reuses them.

A student distilled with rationales (issue #9: the distill manifest's `train_method`
"rationale" or "multitask") is asked as it was trained, student and deployed alike
(`kd2edge.scoring.methods.run_method_items`: `eval_prompt`, `read_answer`; a
rationale student always generates, with a rationale-sized budget). The teacher keeps
the plain prompt: retention is then "the deployed model used as trained, against the
teacher used as it is", on the same items and metrics; the prompt, mode and budget
each model got are recorded in `quality.prompts`. On multiple-choice data such a
student and its deployed copy are also scored with and without a rationale in the
prompt (`quality.rationale_eval`, issue #9 item 4).
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path

from kd2edge.artifacts import Artifact, write_artifact, write_json_atomic
from kd2edge.data.prompts import TRAIN_METHODS
from kd2edge.errors import ArtifactError
from kd2edge.scoring import metrics
from kd2edge.scoring.backends import Backend, OnnxBackend, TorchBackend
from kd2edge.scoring.evaluator import EvalSet, describe, prepare, run_items, summarize, write_predictions

CACHE_VERSION = 1
MODELS = ("teacher", "student", "deployed")
_SUMMARY_KEYS = ("n", "em", "f1", "accuracy", "accuracy_norm", "rouge_l", "by_language")


def run(config, input_artifact: Artifact, out_dir: Path) -> Artifact:
    """Evaluate teacher, student and deployed model on the same items; write predictions and the quality metrics.

    Raises:
        ArtifactError: the input's lineage has no distill stage or its folders are gone.
        DataError: the evaluation split is empty or unreadable.
        ModelError: a model in the lineage cannot be loaded.
    """
    from kd2edge.scoring.methods import method_max_new_tokens, method_mode

    ev, out_dir, runtime = config.evaluate, Path(out_dir), config.profile.runtime
    lineage = find_models(input_artifact)
    method = student_train_method(lineage["student"])
    evalset = prepare(ev.data, ev.split, ev.shots, ev.limit, config.seed)
    settings = describe(evalset, ev.data, ev.mode, ev.max_new_tokens, config.seed, ev.limit)
    backends = {"student": lambda: _torch_backend(lineage["student"].path),
                "deployed": lambda: _onnx_backend(input_artifact.path, runtime.execution_providers, runtime.threads)}
    records, timings, rationale_eval = answer_all(lineage["teacher"], backends, evalset, settings, method, ev)
    summaries = {name: _public(summarize(records[name], evalset.task)) for name in MODELS}
    pred_dir = out_dir / "predictions"
    files = [str(write_predictions(records[n], pred_dir / f"{n}.jsonl").relative_to(out_dir)) for n in MODELS]
    quality = quality_metrics(settings, summaries, records, config.seed)
    quality["train_method"] = method
    quality["prompts"] = {name: {"method": "answer" if name == "teacher" else method,
                                 "mode": method_mode("answer" if name == "teacher" else method, settings["mode"]),
                                 "max_new_tokens": ev.max_new_tokens if name == "teacher" else
                                 method_max_new_tokens(method, ev.max_new_tokens),
                                 "example": records[name][0]["prompt"]} for name in MODELS}
    if rationale_eval:
        files += [str(write_predictions(r.pop("records"), pred_dir / f"rationale_{n}.jsonl").relative_to(out_dir))
                  for n, r in rationale_eval.items()]
        quality["rationale_eval"] = {"max_new_tokens": method_max_new_tokens("rationale", ev.max_new_tokens),
                                     **rationale_eval}
    budgets = {"min_retention": retention_budget(config.profile.budgets.min_retention, quality)}
    plot = plot_quality(summaries, out_dir / "quality.png")
    return write_artifact(out_dir, "evaluate", config.stage_config("evaluate"), input_artifact,
                          {"quality": quality, "budgets": budgets}, timings=timings,
                          files=files + ([plot] if plot else []),
                          models={"teacher": str(lineage["teacher"].path), "student": str(lineage["student"].path),
                                  "deployed": str(input_artifact.path)},
                          warnings=list(evalset.warnings))


def answer_all(teacher: Artifact, backends: dict, evalset: EvalSet, settings: dict, method: str, ev):
    """Every model's per-item records on `evalset`, one model loaded at a time.

    The teacher is asked the plain way (its records cached across runs); the student and the
    deployed model (`backends`: name -> a function opening it) as the student was trained. A
    student trained on rationales is also scored with and without a rationale on multiple choice.

    Returns:
        (records per model, timings, rationale comparison per model or {}).
    """
    from kd2edge.scoring.methods import method_max_new_tokens, rationale_comparison, run_method_items

    # CommonsenseQA with and without rationales, for students that learnt to write them.
    compare = method != "answer" and evalset.task == "multiple_choice" and all(
        p.item.answer_key for p in evalset.prompts)
    records, timings, rationale_eval = {}, {}, {}
    started = time.perf_counter()
    records["teacher"], timings["teacher_cached"] = _teacher_records(teacher, evalset, settings, ev.max_new_tokens,
                                                                     ev.mode)
    timings["teacher_s"] = round(time.perf_counter() - started, 3)
    for name, open_backend in backends.items():
        started = time.perf_counter()
        backend = open_backend()
        records[name] = run_method_items(backend, evalset, method, ev.max_new_tokens, ev.mode, desc=f"evaluate {name}")
        if compare:
            # A rationale student's outputs above are its answers to the rationale prompt: not generated twice.
            reuse = [r["generation"] for r in records[name]] if method == "rationale" else None
            rationale_eval[name] = rationale_comparison(backend, [p.item for p in evalset.prompts],
                                                        method_max_new_tokens("rationale", ev.max_new_tokens),
                                                        ev.mode, rationale_outputs=reuse)
        del backend
        gc.collect()
        timings[f"{name}_s"] = round(time.perf_counter() - started, 3)
    return records, timings, rationale_eval


def student_train_method(student: Artifact) -> str:
    """How the distilled student was trained (`train_method` in its distill manifest; "answer" if absent).

    Raises:
        ArtifactError: the manifest names a method this version does not know.
    """
    method = student.metrics.get("train_method") or \
        (student.manifest.get("config") or {}).get("distill", {}).get("train_method", "answer")
    if method not in TRAIN_METHODS:
        raise ArtifactError(f"{student.path}: the distill manifest's train_method {method!r} is none of "
                            f"{', '.join(TRAIN_METHODS)}: rerun the distill stage with this kd2edge version")
    return method


def find_models(export: Artifact) -> dict[str, Artifact]:
    """The distill artifact (student) and its input (teacher) in an export artifact's lineage.

    Raises:
        ArtifactError: no distill stage in the lineage, or the distill artifact records no input.
    """
    chain = export.lineage()
    student = next((a for a in chain if a.stage == "distill"), None)
    if student is None:
        stages = " <- ".join(a.stage for a in chain)
        raise ArtifactError(f"{export.path}: its lineage ({stages}) has no distill stage: evaluate the export of a "
                            f"kd2edge run, or use `kd2edge evaluate --model` on single models")
    teacher = student.input_artifact()
    if teacher is None:
        raise ArtifactError(f"{student.path}: the distill manifest records no teacher: rerun the distill stage")
    return {"student": student, "teacher": teacher}


def quality_metrics(settings: dict, summaries: dict[str, dict], records: dict[str, list[dict]], seed: int = 0) -> dict:
    """The manifest's `quality` block: scores per model, retention with its interval (overall and per
    language), and the deployed model's regressions."""
    kept = {name: metrics.retention(summaries["teacher"], summaries[name]) for name in ("student", "deployed")}
    for r in kept.values():
        r.pop("n", None)
    lost = metrics.regressions(records["teacher"], records["deployed"], limit=None)
    same = sum(s["prediction"] == d["prediction"] for s, d in zip(records["student"], records["deployed"]))
    return {
        "dataset": settings["dataset"], "split": settings["split"], "split_info": settings["split_info"],
        "task": settings["task"],
        "shots": settings["shots"], "n": summaries["teacher"]["n"], "mode": settings["mode"],
        "max_new_tokens": settings["max_new_tokens"], "prompt_template": settings["prompt_template"],
        **summaries,
        "retention_f1": kept["deployed"].get("f1"), "retention_em": kept["deployed"].get("em"),
        "retention": kept,
        "retention_f1_interval": retention_intervals(records, "f1", seed),
        # How often the deployed (4-bit ONNX) model answers exactly as the fp32 student: the
        # quantize + export transformation checked against its reference on the task itself.
        "deployed_student_agreement": same / len(records["student"]),
        "regressions": lost[:20],
        "n_regressions": len(lost),
    }


def retention_intervals(records: dict[str, list[dict]], metric: str, seed: int) -> dict:
    """Paired bootstrap intervals of the deployed and fp32 student's retention of `metric`, overall and per language.

    Returns:
        {"deployed": interval, "student": interval, "by_language": {lang: {"deployed": ..., "student": ...}}},
        each interval as `metrics.paired_bootstrap_retention` gives it.
    """
    def intervals(keep) -> dict:
        teacher = [r[metric] for r in records["teacher"] if keep(r)]
        return {name: metrics.paired_bootstrap_retention(teacher, [r[metric] for r in records[name] if keep(r)],
                                                         seed=seed) for name in ("deployed", "student")}

    languages = sorted({r["language"] for r in records["teacher"]})
    by_language = ({lang: intervals(lambda r, lang=lang: r["language"] == lang) for lang in languages}
                   if len(languages) > 1 else {})
    return {**intervals(lambda r: True), "by_language": by_language}


def retention_budget(limit: float, quality: dict) -> dict:
    """The `min_retention` verdict: on the point estimate, with the interval and what it says.

    The gate passes on the point estimate (F1 retention of the deployed model); when the 95%
    interval contains the limit, the verdict says so: the items cannot tell pass from fail.
    """
    value = quality["retention_f1"]
    interval = quality["retention_f1_interval"]["deployed"]
    verdict = {"limit": limit, "value": value, "pass": None if value is None else bool(value >= limit),
               "interval": [interval["low"], interval["high"]], "level": interval["level"], "n": interval["n"]}
    if interval["low"] is not None and interval["low"] <= limit <= interval["high"]:
        verdict["note"] = (f"the {interval['level']:.0%} interval [{interval['low']:.3f}, {interval['high']:.3f}] "
                           f"contains the limit {limit}: {interval['n']} items cannot tell pass from fail")
    return verdict


def teacher_cache_key(teacher: Artifact, settings: dict) -> str:
    """What decides the teacher's scores: its content hash and the evaluation settings (items, prompts)."""
    blob = json.dumps({"v": CACHE_VERSION, "teacher": teacher.content_hash, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _teacher_records(teacher: Artifact, evalset: EvalSet, settings: dict, max_new_tokens: int,
                     mode: str) -> tuple[list[dict], bool]:
    from kd2edge.models import cache_dir

    path = cache_dir() / "evaluate" / f"teacher-{teacher_cache_key(teacher, settings)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["records"], True
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed and overwritten
    backend = _torch_backend(teacher.path)
    records = run_items(backend, evalset, max_new_tokens, mode, desc="evaluate teacher")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"settings": settings, "teacher": str(teacher.path), "records": records})
    return records, False


def _torch_backend(folder: Path) -> Backend:
    from kd2edge.models import load_causal_lm, model_folder

    model, tokenizer = load_causal_lm(model_folder(folder))
    return TorchBackend(model, tokenizer)


def _onnx_backend(folder: Path, providers, threads) -> Backend:
    from kd2edge.runtime.lm import OnnxLM

    # The evaluation host may lack the device's accelerator: the figures are the model's,
    # so falling back to CPU is allowed (the runtime records it in its notes).
    return OnnxBackend(OnnxLM.load(folder, providers=providers, threads=threads, allow_fallback=True))


def _public(summary: dict) -> dict:
    return {k: summary[k] for k in _SUMMARY_KEYS if k in summary}


def plot_quality(summaries: dict[str, dict], path: Path) -> str | None:
    """Grouped bars of each model's scores (Agg backend); returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("em", "f1", "accuracy", "rouge_l") if k in summaries["teacher"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(MODELS)
    for i, name in enumerate(MODELS):
        xs = [j + (i - 1) * width for j in range(len(keys))]
        bars = ax.bar(xs, [summaries[name][k] for k in keys], width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"QA quality (n={summaries['teacher']['n']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def evaluate_needs(teacher_params: int, student_params: int, deployed_bytes: int, items: int):
    """Disk and peak memory of scoring teacher, student and deployed model (bytes).

    The three models are loaded one after the other (each backend is dropped before the next),
    so memory is the largest of: teacher in fp32 (4 B/param), student in fp32, the deployed
    ONNX session (twice its size: weights and pre-packed copies). Disk: three predictions
    files (at most 4 KiB per item each: prompt, prediction, references) and the plot.

    Returns:
        kd2edge.resources.Needs.
    """
    from kd2edge.resources import Needs

    memory = max(4 * teacher_params, 4 * student_params, 2 * deployed_bytes)
    return Needs(disk_bytes=3 * 4096 * items + 2**20, memory_bytes=memory)


def estimate(config, input_artifact: Artifact):
    """What evaluating `input_artifact`'s lineage needs (see evaluate_needs).

    Raises:
        ArtifactError: as `find_models`, before any model is loaded.
    """
    from kd2edge.models import model_folder
    from kd2edge.resources import folder_size
    from kd2edge.sizing import stored_weights

    lineage = find_models(input_artifact)
    teacher, _ = stored_weights(model_folder(lineage["teacher"].path))
    student, _ = stored_weights(model_folder(lineage["student"].path))
    # limit None scores the whole split: 10,000 items stands for "large" in the disk figure.
    return evaluate_needs(teacher, student, folder_size(input_artifact.path), config.evaluate.limit or 10_000)
