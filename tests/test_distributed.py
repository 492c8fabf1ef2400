"""kd2edge.distributed and the launch flags, without starting processes (tests/distill/test_multiprocess.py does)."""

from __future__ import annotations

import pytest

from kd2edge.distributed import Launch, Ranks, accelerate_args, launch_spec
from kd2edge.errors import ConfigError


def test_one_process_needs_no_launch():
    assert launch_spec(None) is None
    assert launch_spec(1) is None


def test_launch_flags_are_checked_together():
    with pytest.raises(ConfigError, match="--num-machines, --machine-rank need --num-processes"):
        launch_spec(None, num_machines=2, machine_rank=1)
    with pytest.raises(ConfigError) as e:
        launch_spec(3, num_machines=2, machine_rank=2)
    message = str(e.value)
    assert "must be a multiple of --num-machines 2" in message
    assert "needs --main-process-ip" in message and "--machine-rank 2 must lie in 0..1" in message


def test_flags_inside_a_launched_process_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="already started by a launcher"):
        launch_spec(2)


def test_one_machine_uses_the_torchrun_launcher_and_a_free_port():
    args = accelerate_args(Launch(2), cpu=True, cpu_cores=8)
    # --multi_gpu is accelerate's torchrun launcher; with --cpu it would start a single process.
    assert args[0] == "--multi_gpu" and "--cpu" not in args
    assert args[args.index("--num_processes") + 1] == "2"
    assert args[args.index("--main_process_port") + 1] == "0"
    assert args[args.index("--num_cpu_threads_per_process") + 1] == "4"


def test_two_machines_pass_through_to_accelerate():
    """The README's two-machine example: accelerate parses the flags into torchrun's rendezvous."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    spec = launch_spec(8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29500)
    args = accelerate_args(spec, cpu=False)
    assert args == ["--multi_gpu", "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "10.0.0.1",
                    "--main_process_port", "29500"]
    parsed = launch_command_parser().parse_args([*args, "-m", "kd2edge.cli", "distill", "--out", "x"])
    parsed.num_cpu_threads_per_process, parsed.dynamo_mode = 1, "default"
    env = prepare_multi_gpu_env(parsed)
    assert (parsed.nproc_per_node, parsed.nnodes, parsed.node_rank) == ("4", "2", 1)
    assert parsed.rdzv_endpoint == "10.0.0.1:29500" and env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_an_accelerate_config_replaces_the_default_launcher():
    args = accelerate_args(Launch(2, config_file="my.yaml"), cpu=False)
    assert args[:2] == ["--config_file", "my.yaml"] and "--multi_gpu" not in args


def test_one_process_ranks_are_plain_calls():
    group = Ranks()
    assert group.is_main and group.broadcast(3) == 3 and group.gather("a") == ["a"] and group.sum([1.5, 2]) == [1.5, 2]
    assert group.main_first(lambda: "x") == "x"


def test_only_distill_runs_in_several_processes(monkeypatch, tmp_path):
    import kd2edge.pipeline as pipeline
    from kd2edge.config import load_config

    monkeypatch.setattr(pipeline, "ranks", lambda: Ranks(rank=0, world=2))
    with pytest.raises(ConfigError, match="the quantize stage runs as one process but 2 were launched"):
        pipeline.run_stage("quantize", load_config(profile="laptop-cpu"), None, tmp_path / "quantize")


def test_rationales_and_grpo_are_refused_in_several_processes():
    from kd2edge.config import load_config
    from kd2edge.distill.stage import _check_processes

    config = load_config(profile="laptop-cpu", overrides={"distill.data_method": "rationale",
                                                          "distill.train_method": "rationale",
                                                          "distill.grpo_steps": 2})
    _check_processes(config.distill, Ranks())
    with pytest.raises(ConfigError, match="2 processes: data_method 'rationale'.*; grpo_steps"):
        _check_processes(config.distill, Ranks(rank=1, world=2))
