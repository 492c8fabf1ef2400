"""`kd2edge`: the command line. Thin: parse, call one library function, print.

Stage commands live beside their stage (`kd2edge/<pkg>/cli.py`) and are loaded
lazily, so `kd2edge --help` and `kd2edge profiles list` never import torch.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

import click

from kd2edge import __version__
from kd2edge.cli_common import (config_option, emit, fail_line, info, json_option, launch_options, profile_option,
                                table, warn)
from kd2edge.distributed import is_secondary_process
from kd2edge.errors import Interrupted, Kd2EdgeError, LaunchFailed

# name -> (module, attribute, one-line help shown in `kd2edge --help`)
LAZY_COMMANDS = {
    "plan": ("kd2edge.distill.cli", "plan", "List candidate students for a profile and pick one."),
    "distill": ("kd2edge.distill.cli", "distill", "Distill a student from a teacher."),
    "generate-data": ("kd2edge.reasoning.cli", "generate_data", "Have the teacher write answers, rationales or critique-revised rationales."),
    "grpo": ("kd2edge.reasoning.cli", "grpo", "Fine-tune a distilled student with GRPO on QA rewards."),
    "eval-rationales": ("kd2edge.reasoning.cli", "eval_rationales", "Multiple-choice accuracy with and without a rationale."),
    "quantize": ("kd2edge.quantize.cli", "quantize", "Quantize a model to 4 bits with GPTQ (or RTN)."),
    "export": ("kd2edge.export.cli", "export", "Export a quantized model to ONNX with a KV cache."),
    "generate": ("kd2edge.export.cli", "generate", "Answer a question with an exported artifact."),
    "profile": ("kd2edge.profiling.cli", "profile", "Measure latency, memory and size against the budgets."),
    "evaluate": ("kd2edge.evaluate.cli", "evaluate", "Score QA accuracy (EM/F1, accuracy, Rouge-L)."),
    "package": ("kd2edge.package.cli", "package", "Write a Docker build context for a profile."),
    "serve": ("kd2edge.package.cli", "serve", "Serve an exported artifact over HTTP."),
}


class LazyGroup(click.Group):
    """A group whose stage commands are imported only when invoked."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr, _ = LAZY_COMMANDS[name]
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                return _missing_command(name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = [(n, LAZY_COMMANDS[n][2] if n in LAZY_COMMANDS else self.commands[n].get_short_help_str(60))
                for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _missing_command(name: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command():
        raise Kd2EdgeError(f"`kd2edge {name}` is not built in this version ({__version__})")
    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kd2edge")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, debug):
    """kd2edge: teacher LLM -> distilled, 4-bit GPTQ, ONNX artifact for an edge device.

    \b
    Quick start (offline, embedded teacher and data):
      kd2edge run --profile laptop-cpu --out runs/demo
    """
    ctx.ensure_object(dict)["debug"] = debug


@cli.command()
@profile_option
@config_option
@click.option("--out", "-o", type=click.Path(file_okay=False), default="runs/latest", show_default=True,
              help="Run folder: one sub-folder per stage, report.json and report.html.")
@click.option("--teacher", default=None, help="Teacher: 'embedded', a hub id, a folder or a .gguf file.")
@click.option("--student", default=None, help="Student: a hub id or folder sharing the teacher's tokenizer. [default: planned from the teacher]")
@click.option("--data", default=None, help="Dataset: 'embedded' (-en/-es), a hub id, a SQuAD JSON / JSONL file, mlqa:PATH:LANG; SPEC@split[slice] picks a part, e.g. FILE@train[:80%].")
@click.option("--steps", type=int, default=None, help="Distillation optimizer steps.")
@click.option("--data-method", type=click.Choice(["answer", "rationale", "critique-revision"]), default=None,
              help="Training targets: gold/teacher answers, teacher rationales, or critique-revised rationales.")
@click.option("--train-method", type=click.Choice(["answer", "rationale", "multitask"]), default=None,
              help="How rationale data is trained on (needs --data-method rationale|critique-revision).")
@click.option("--grpo-steps", type=click.IntRange(min=0), default=None, help="GRPO steps after KD (0: none).")
@click.option("--teacher-cache", type=click.Path(file_okay=False), default=None,
              help="A folder for the teacher's cached top-k logits, shared across runs (see `kd2edge distill --help`).")
@click.option("--seed", type=int, default=None)
@click.option("--force", is_flag=True, help="Rerun every stage even if its output is up to date.")
@click.option("--no-gate", is_flag=True, help="Report budgets without failing the run.")
@click.option("--print-config", is_flag=True, help="Print the fully resolved config as JSON and exit.")
@launch_options
@json_option
def run(profile, config_file, out, teacher, student, data, steps, data_method, train_method, grpo_steps, teacher_cache,
        seed, force, no_gate, print_config, num_processes, num_machines, machine_rank, main_process_ip,
        main_process_port, accelerate_config, as_json):
    """Run every stage in order: distill, quantize, export, profile, evaluate, package.

    A rerun skips the stages whose output already matches their config and input,
    so a run that was stopped resumes where it stopped. With --num-processes N the distill
    stage runs in N processes through accelerate's launcher, the other stages in this one;
    on a machine other than rank 0 (--machine-rank) only the distill stage runs.
    """
    from kd2edge.config import data_leak_warning, dump_config, load_config
    from kd2edge.distributed import launch_spec
    from kd2edge.models import resolve_model
    from kd2edge.pipeline import make_run_dir, run_launched_stage, run_pipeline

    overrides = {"teacher": teacher, "data": data, "seed": seed, "distill.student": student,
                 "distill.steps": steps, "distill.data_method": data_method, "distill.train_method": train_method,
                 "distill.grpo_steps": grpo_steps, "distill.teacher_cache": teacher_cache,
                 "profiling.gate": False if no_gate else None}
    config = load_config(config_file, profile=profile, overrides=overrides)
    if print_config:
        click.echo(dump_config(config), nl=False)
        return
    spec = launch_spec(num_processes, num_machines, machine_rank, main_process_ip, main_process_port, accelerate_config)
    if (leak := data_leak_warning(config)) is not None:
        warn(leak)
    out_dir = Path(out)
    info(f"kd2edge {__version__}: profile {config.profile.name}, teacher {config.teacher}, run folder {out_dir}"
         + (f", distill in {spec.num_processes} processes" if spec else ""))
    if spec is not None and spec.machine_rank > 0:
        # Machine 0 runs the other stages; this one only takes its share of the distill stage.
        make_run_dir(out_dir)
        result = run_launched_stage("distill", config, resolve_model(config.teacher), out_dir / "distill", spec,
                                    force=force)
        info(f"   distill: {result.status} (machine {spec.machine_rank}); machine 0 runs the other stages")
        return

    def on_stage(stage, event):
        _CURRENT_STAGE[0] = stage if event == "start" else None
        if event == "start":
            info(f"== {stage}")
        else:
            info(f"   {stage}: {event}")

    report = run_pipeline(config, out_dir, force=force, on_stage=on_stage, spec=spec)
    emit(report, as_json, _run_summary)


def _run_summary(report: dict) -> str:
    lines = [f"profile {report['profile']}"]
    for stage, s in report["stages"].items():
        lines.append(f"  {stage:<9} {s['status']:<8} {s.get('path') or ''}")
        for message in s.get("warnings") or []:
            lines.append(f"    warning: {message}")
    lines += quality_lines(report.get("quality") or {})
    rows = [[k, v.get("limit"), v.get("value"), {True: "pass", False: "FAIL", None: "-"}[v.get("pass")]]
            for k, v in report["budgets"].items()]
    lines.append(table(rows, ["budget", "limit", "value", "verdict"]))
    lines += [f"  {k}: {v['note']}" for k, v in report["budgets"].items() if v.get("note")]
    open_budgets = [k for k, v in report["budgets"].items() if v.get("pass") is None]
    verdict = {True: "PASS", False: "FAIL", None: "UNDECIDED (not measured: " + ", ".join(open_budgets) + ")"}
    lines.append(f"overall: {verdict[report['pass']]}")
    return "\n".join(lines)


def quality_lines(q: dict) -> list[str]:
    """Teacher / student / deployed F1 and the deployed model's retention with its interval, overall and
    per language."""
    if "teacher" not in q:
        return []

    def retention(interval: dict) -> str:
        if interval.get("value") is None:
            return "undefined (teacher F1 is 0)"
        span = (f" [{interval['low']:.2f}, {interval['high']:.2f}]" if interval.get("low") is not None else "")
        return f"{interval['value']:.2f}{span}"

    intervals = q.get("retention_f1_interval") or {}
    overall = intervals.get("deployed") or {"value": q.get("retention_f1")}
    lines = [f"{q.get('dataset')} {q.get('split')}, {q.get('n')} items, {q.get('shots')}-shot: F1 teacher "
             f"{q['teacher']['f1']:.3f}, student {q['student']['f1']:.3f}, deployed {q['deployed']['f1']:.3f}; "
             f"retention {retention(overall)}" + (" (95% paired bootstrap)" if overall.get("low") is not None else "")]
    for lang, by in (intervals.get("by_language") or {}).items():
        scores = {m: ((q.get(m) or {}).get("by_language") or {}).get(lang, {}) for m in ("teacher", "deployed")}
        lines.append(f"  {lang}: {by['deployed']['n']} items, F1 teacher {scores['teacher'].get('f1', 0):.3f}, "
                     f"deployed {scores['deployed'].get('f1', 0):.3f}, EM {scores['deployed'].get('em', 0):.3f}; "
                     f"retention {retention(by['deployed'])}")
    return lines


@cli.group()
def profiles():
    """Device profiles: list them or show one."""


@profiles.command("list")
@json_option
def profiles_list(as_json):
    """List the built-in device profiles."""
    from kd2edge.profiles import list_profiles
    from kd2edge.schema import to_dict
    from kd2edge.units import format_bytes

    items = list_profiles()
    rows = [[p.name, p.hardware.arch, p.hardware.cores, format_bytes(p.hardware.memory),
             ",".join(e.replace("ExecutionProvider", "") for e in p.runtime.execution_providers),
             p.description[:60]] for p in items]
    emit([to_dict(p) for p in items], as_json, table(rows, ["name", "arch", "cores", "memory", "providers", "description"]))


@profiles.command("show")
@click.argument("name")
@json_option
def profiles_show(name, as_json):
    """Show one profile (a name or a .toml file), fully resolved."""
    import json

    from kd2edge.profiles import load_profile
    from kd2edge.schema import to_dict

    data = to_dict(load_profile(name))
    emit(data, as_json, lambda d: json.dumps(d, indent=2))


_CURRENT_STAGE: list[str | None] = [None]


def _on_sigterm(signum, frame):
    raise Interrupted("stopped by SIGTERM")


def main(argv: list[str] | None = None) -> int:
    """Entry point: turn user errors into one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KD2EDGE_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="kd2edge", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:  # Ctrl-C inside a click prompt
        return _interrupted("interrupted")
    except click.ClickException as e:
        if debug:
            raise
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        fail_line(e.format_message().replace("\n", " ") + hint)
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted("interrupted by Ctrl-C")
    except Interrupted as e:
        return _interrupted(str(e))
    except LaunchFailed as e:   # the launched process that failed printed its error
        return e.exit_code
    except Kd2EdgeError as e:
        if debug:
            raise
        fail_line(str(e).replace("\n", " "))
        return e.exit_code


def _interrupted(what: str) -> int:
    if is_secondary_process():   # stopped with the others: the main process says what happened
        return 130
    stage = _CURRENT_STAGE[0]
    where = f" during the {stage} stage" if stage else ""
    fail_line(f"{what}{where}; finished stages are kept: run the same command again to resume")
    return 130


if __name__ == "__main__":
    sys.exit(main())


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
