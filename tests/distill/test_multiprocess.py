"""Distillation in several processes: the batch split, the loss weighting, and (slow) real 2-process runs.

The slow tests start the README's CPU command, `accelerate launch --multi_gpu --num_processes 2
... -m kd2edge.cli distill`, and `kd2edge distill --num-processes 2`, on a tiny 4-layer teacher
with the embedded data, and compare them with a one-process run at the same global batch.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from kd2edge.distill.train import micro_batch_indices

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("world, grad_accum", [(2, 1), (4, 1), (2, 3)])
def test_processes_at_a_share_of_the_batch_read_one_process_batch(world, grad_accum, grouped):
    """W processes at batch B/W read, per step, exactly the examples one process reads at batch B:
    in rank order they are consecutive slices of its micro-batch, so disjoint, across epoch ends too,
    with the micro-batches grouped by length or not."""
    n, batch, seed = 13, 8, 5
    lengths = [(7 * i) % 11 + 3 for i in range(n)] if grouped else None
    for step in range(10):
        for a in range(grad_accum):
            one = micro_batch_indices(n, batch, step * grad_accum + a, seed, lengths, batch * grad_accum)
            shares = [micro_batch_indices(n, batch // world, (step * grad_accum + a) * world + r, seed, lengths,
                                          batch * grad_accum) for r in range(world)]
            assert sum(shares, []) == one


def test_length_grouping_is_a_permutation_that_pads_less():
    """Each epoch reads every example once; sorted chunks make a batch's lengths close (lengths 1..64
    in a shuffled order: random batches of 4 pad to over 1.3x the real tokens, grouped ones under 1.1x)."""
    from kd2edge.distill.train import epoch_order

    n, batch = 64, 4
    lengths = epoch_order(n, epoch=99, seed=1)            # a shuffle of 0..63, as lengths 1..64
    lengths = [x + 1 for x in lengths]
    padding = {}
    for grouped in (False, True):
        order = epoch_order(n, 0, 3, lengths if grouped else None, batch)
        assert sorted(order) == list(range(n))
        batches = [order[i:i + batch] for i in range(0, n, batch)]
        padding[grouped] = sum(max(lengths[i] for i in b) * batch for b in batches) / sum(lengths)
    assert padding[False] > 1.3 and padding[True] < 1.1
    assert epoch_order(n, 0, 3, lengths, batch) == epoch_order(n, 0, 3, lengths, batch)   # pure


def _examples(tokenizer, count: int, seed: int):
    """Sequences of unequal lengths and answers, so that micro-batches hold unequal numbers of positions."""
    from kd2edge.distill.data import encode_example

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt = torch.randint(3, len(tokenizer), (int(torch.randint(6, 30, (1,), generator=g)),), generator=g)
        answer = torch.randint(3, len(tokenizer), (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        out.append(encode_example(prompt.tolist(), answer.tolist(), 64, str(i)))
    return out


def test_a_step_is_the_global_batch_mean_however_it_is_split(tmp_path):
    """Batch 4 in one micro-batch and batch 2 x 2 accumulated give the same steps: each micro-batch is
    weighted by its share of the step's positions (as each process's is, over processes)."""
    from kd2edge.distill.data import compute_teacher_logits
    from kd2edge.distill.train import train_student
    from kd2edge.testing import tiny_model

    teacher, tok = tiny_model("llama", num_layers=2, seed=1)
    student, _ = tiny_model("llama", num_layers=1, seed=2)
    examples = _examples(tok, 12, seed=3)
    cache = compute_teacher_logits(teacher, examples, vocab_size=len(tok), topk=8, pad_id=tok.pad_token_id,
                                   kd_positions="all", progress=False)
    common = dict(vocab_size=len(tok), pad_id=tok.pad_token_id, loss="forward_kl", temperature=1.0, kd_ratio=0.5,
                  beta=0.5, steps=4, lr=1e-3, warmup_ratio=0.0, max_grad_norm=1.0, seed=0, checkpoint_every=100,
                  kd_positions="all", progress=False, mixed_precision="no")   # fp32: the sums must agree to 1e-5
    runs = {}
    for name, batch, accum in (("whole", 4, 1), ("split", 2, 2)):
        model = copy.deepcopy(student)
        result = train_student(model, examples, cache, batch_size=batch, grad_accum=accum, work_dir=tmp_path / name,
                               **common)
        runs[name] = (model, result.history)
    (a, history_a), (b, history_b) = runs["whole"], runs["split"]
    for row_a, row_b in zip(history_a, history_b, strict=True):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-5, abs=1e-6), (key, row_a, row_b)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_a_checkpoint_resumes_with_as_many_processes_only(tmp_path):
    from kd2edge.distill.train import _rng_state, load_checkpoint, save_checkpoint
    from kd2edge.distributed import Ranks
    from kd2edge.errors import ConfigError
    from kd2edge.testing import tiny_model

    model, _ = tiny_model("llama", num_layers=1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, scheduler, 2, [], rng_states=[_rng_state(), _rng_state()])
    with pytest.raises(ConfigError, match="taken with 2 process.*resume with --num-processes 2"):
        load_checkpoint(path, model, optimizer, scheduler, Ranks())
    assert load_checkpoint(path, model, optimizer, scheduler, Ranks(rank=1, world=2)) == (2, [])


# ---------------------------------------------------------------------------------------------
# Real processes (slow): the README's commands on a tiny teacher.

STEPS, GLOBAL_BATCH = 6, 4
# One process and two at the same global batch differ only in the order in which floats are
# summed (DDP's all-reduce, the loss weights): per step the loss may differ by this much.
LOSS_TOLERANCE = 1e-4


def _settings(batch_size: int) -> dict:
    return {"data": "embedded",
            "distill": {"steps": STEPS, "batch_size": batch_size, "max_param_fraction": 0.9, "eval_limit": 3,
                        "checkpoint_every": 2, "lr": 1e-3, "topk_logits": 16,
                        # fp32: bf16 (auto on CPUs with it) rounds each micro-batch shape differently
                        "mixed_precision": "no"},
            "evaluate": {"max_new_tokens": 3, "shots": 0}}


def _env(tmp: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "KD2EDGE_CACHE": str(tmp / "kd2edge-cache"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


def readme_command(marker: str) -> list[str]:
    """The shell command on the README line that starts with `marker` (a `\\`-continued line joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(marker)]
    assert len(lines) == 1, f"the README has {len(lines)} lines starting with {marker!r}"
    return shlex.split(lines[0])


# A launch on a loaded 2-core machine took 10 minutes to start its processes: generous, but bounded.
TIMEOUT_S = 2400


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it (torchrun starts each rank in its own session,
    so killing the launcher's process group would leave the ranks waiting at a barrier)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _run(argv: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{argv[:6]} ran past {TIMEOUT_S} s:\n{err[-4000:]}")
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _trace(folder: Path) -> dict[int, dict[int, list[int]]]:
    """{rank: {step: example indices}} from the KD2EDGE_TEST_TRACE_BATCHES files."""
    out: dict[int, dict[int, list[int]]] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        rank = int(re.fullmatch(r"rank(\d+)\.jsonl", path.name).group(1))
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(rank, {}).setdefault(row["step"], []).extend(row["indices"])
    return out


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-process run at batch 4 (in this process), and the README's 2-process command at batch 2 per
    process, both tracing the examples of each step, the latter with a shared --teacher-cache folder."""
    from kd2edge.config import load_config
    from kd2edge.models import resolve_model
    from kd2edge.pipeline import run_stage
    from kd2edge.testing import tiny_model_dir

    tmp = tmp_path_factory.mktemp("multiprocess")
    teacher = tiny_model_dir(tmp / "teacher", "llama", num_layers=4)
    for name, batch in (("one", GLOBAL_BATCH), ("two", GLOBAL_BATCH // 2)):
        (tmp / f"{name}.json").write_text(json.dumps(_settings(batch)))
        (tmp / f"trace-{name}").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD2EDGE_TEST_TRACE_BATCHES", str(tmp / "trace-one"))
        mp.setenv("KD2EDGE_CACHE", str(tmp / "kd2edge-cache"))
        config = load_config(tmp / "one.json", profile="laptop-cpu", overrides={"teacher": str(teacher)})
        one = run_stage("distill", config, resolve_model(str(teacher)), tmp / "one" / "distill").artifact
    # The README line as written, then this test's tiny settings (later flags win).
    argv = readme_command("accelerate launch --multi_gpu --num_processes 2")
    assert argv[:argv.index("-m") + 2] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                                           "--main_process_port", "0", "-m", "kd2edge.cli"]
    accelerate = Path(sys.executable).with_name("accelerate")
    argv = [str(accelerate), *argv[1:], "--teacher", str(teacher), "--config", str(tmp / "two.json"),
            "--out", str(tmp / "two" / "distill"), "--teacher-cache", str(tmp / "teacher-cache"), "--json"]
    done = _run(argv, _env(tmp, KD2EDGE_TEST_TRACE_BATCHES=str(tmp / "trace-two")), cwd=tmp)
    return {"tmp": tmp, "teacher": teacher, "one": one, "two": tmp / "two" / "distill", "stdout": done.stdout,
            "stderr": done.stderr}


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(runs):
    from kd2edge.artifacts import Artifact

    two = Artifact.load(runs["two"], stage="distill")
    one = runs["one"]
    # One stage folder, one manifest, written by the main process; nothing else in the run folder.
    assert sorted(p.name for p in runs["two"].parent.iterdir()) == ["distill"]
    printed = json.loads(runs["stdout"])   # one JSON document: the second process printed nothing
    assert printed["path"] == str(runs["two"])
    d = two.metrics["distributed"]
    assert (d["num_processes"], d["backend"], d["global_batch"]) == (2, "gloo", GLOBAL_BATCH)
    assert [p["sequences"] for p in d["per_process"]] == [STEPS * GLOBAL_BATCH // 2] * 2
    assert sum(p["tokens"] for p in d["per_process"]) == one.metrics["train"]["tokens"] == two.metrics["train"]["tokens"]
    # The same optimizer steps, the same losses within the stated tolerance, the same validation F1.
    h1 = (runs["one"].path / "loss_history.csv").read_text().splitlines()[1:]
    h2 = (runs["two"] / "loss_history.csv").read_text().splitlines()[1:]
    assert len(h1) == len(h2) == STEPS
    diffs = [abs(float(a.split(",")[1]) - float(b.split(",")[1])) for a, b in zip(h1, h2)]
    assert max(diffs) <= LOSS_TOLERANCE, diffs
    n = two.metrics["eval"]["n"]
    assert abs(two.metrics["f1_after"] - one.metrics["f1_after"]) <= 1 / n
    a, b = _weights(one.path), _weights(runs["two"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


@pytest.mark.slow
def test_the_ranks_split_each_step_of_the_one_process_run(runs):
    one, two = _trace(runs["tmp"] / "trace-one"), _trace(runs["tmp"] / "trace-two")
    assert sorted(two) == [0, 1] and sorted(one) == [0]
    for step in range(STEPS):
        r0, r1 = two[0][step], two[1][step]
        assert len(r0) == len(r1) == GLOBAL_BATCH // 2
        # Disjoint halves of the step's global batch, which is exactly the one-process batch.
        assert not set(r0) & set(r1) and r0 + r1 == one[0][step]
    # The run reads STEPS x GLOBAL_BATCH items, one epoch: every example once.
    seen = [i for rank in two.values() for indices in rank.values() for i in indices]
    assert sorted(seen) == list(range(STEPS * GLOBAL_BATCH))


@pytest.mark.slow
def test_the_teacher_cache_is_written_once(runs):
    from kd2edge.artifacts import Artifact

    cache = runs["tmp"] / "teacher-cache"
    files = sorted(p.name for p in cache.iterdir() if not p.name.startswith(".launch-probe"))
    assert len(files) == 1 and files[0].startswith("teacher_logits-"), files   # no part or temporary file left
    info = Artifact.load(runs["two"]).metrics["distributed"]["teacher_cache"]
    assert info == {"file": files[0], "reused": False, "processes": 2, "folder": str(cache), "precision": "fp32"}
    # The one-process run computed the same rows (the same key) in its own work folder.
    assert runs["one"].metrics["distributed"]["teacher_cache"]["file"] == files[0]


@pytest.mark.slow
def test_killing_both_processes_after_a_checkpoint_then_resuming_gives_the_same_student(runs):
    """`kd2edge distill --num-processes 2`, killed (SIGKILL, launcher and both processes) after the
    checkpoint of step 2, then run again: the student equals the uninterrupted 2-process run's."""
    import psutil

    from kd2edge.artifacts import Artifact

    tmp, out = runs["tmp"], runs["tmp"] / "resumed" / "distill"
    argv = [sys.executable, "-m", "kd2edge.cli", "distill", "--num-processes", "2", "--teacher", str(runs["teacher"]),
            "--config", str(tmp / "two.json"), "--out", str(out), "--teacher-cache", str(tmp / "teacher-cache")]
    proc = subprocess.Popen(argv, env=_env(tmp, KD2EDGE_TEST_PAUSE_AFTER_CHECKPOINT="300"), cwd=tmp,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    watchdog = threading.Timer(TIMEOUT_S, _kill_tree, [proc.pid])   # stderr closes if the run hangs
    watchdog.start()
    try:
        for line in proc.stderr:
            seen.append(line)
            if "checkpoint at step 2 written" in line:
                break
        else:
            pytest.fail("no checkpoint was written:\n" + "".join(seen)[-4000:])
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len([p for p in victims if "kd2edge.cli" in " ".join(p.cmdline())]) == 3   # launcher + 2 ranks
    finally:
        watchdog.cancel()
        _kill_tree(proc.pid)
        proc.wait()
    assert not out.exists() and (out.parent / ".distill.work" / "checkpoint.pt").is_file()
    cache_file = next(p for p in (tmp / "teacher-cache").glob("teacher_logits-*.pt"))
    mtime = cache_file.stat().st_mtime_ns
    _run(argv, _env(tmp), cwd=tmp)
    resumed = Artifact.load(out, stage="distill")
    assert resumed.metrics["train"]["resumed_from"] == 2
    assert resumed.metrics["distributed"]["teacher_cache"]["reused"] is True and cache_file.stat().st_mtime_ns == mtime
    a, b = _weights(runs["two"]), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out.parent / ".distill.work").exists()


@pytest.mark.slow
def test_kd2edge_run_launches_its_distill_stage_with_the_same_result(runs):
    """`kd2edge run --num-processes 2` hands the distill stage to `run_launched_stage`: the run's config
    goes to the processes through a file and comes back with the same fingerprint (a second call skips)."""
    from kd2edge.config import load_config
    from kd2edge.distributed import Launch
    from kd2edge.models import resolve_model
    from kd2edge.pipeline import run_launched_stage

    tmp, out = runs["tmp"], runs["tmp"] / "run" / "distill"
    config = load_config(tmp / "two.json", profile="laptop-cpu",
                         overrides={"teacher": str(runs["teacher"]), "distill.teacher_cache": str(tmp / "teacher-cache")})
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _env(tmp).items():
            mp.setenv(key, value)
        teacher = resolve_model(str(runs["teacher"]))
        first = run_launched_stage("distill", config, teacher, out, Launch(2))
        again = run_launched_stage("distill", config, teacher, out, Launch(2))
    assert (first.status, again.status) == ("done", "skipped")
    assert first.artifact.manifest["fingerprint"] == again.artifact.manifest["fingerprint"]
    a, b = _weights(runs["two"]), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_machines_on_one_host(runs):
    """The README's two-machine command, both "machines" on this host with one process each: the
    multi-machine flags reach torchrun's rendezvous and the result is the one-machine run's."""
    import socket

    tmp, out = runs["tmp"], runs["tmp"] / "nodes" / "distill"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "kd2edge.cli", "distill", "--num-processes", "2",
                               "--num-machines", "2", "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1",
                               "--main-process-port", str(port), "--teacher", str(runs["teacher"]),
                               "--config", str(tmp / "two.json"), "--out", str(out),
                               "--teacher-cache", str(tmp / "teacher-cache")],
                              env=_env(tmp), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            _kill_tree(p.pid)
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in results]
    from kd2edge.artifacts import Artifact

    d = Artifact.load(out).metrics["distributed"]
    assert d["num_processes"] == 2 and d["backend"] == "gloo"
    a, b = _weights(runs["two"]), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
