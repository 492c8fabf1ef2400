"""Several processes (GPUs, CPU processes, machines) for the distill stage, through accelerate.

Two halves:

* Inside a launched process, `ranks()` says which process this is (`Ranks`: rank, world size,
  backend) and gives the few collective steps the stage needs: a barrier, "the main process
  first", broadcasting the main process's value, summing numbers over processes. They are
  accelerate's (`PartialState`, `broadcast_object_list`, `gather_object`, `reduce`), on a process
  group created with a long timeout (`timeout_s`): the other processes wait at a barrier while the
  main one scores the student or writes the stage folder, which takes more than torch's default
  30 minutes with a 7B teacher. Outside a launcher (no WORLD_SIZE) everything is one process and
  nothing touches torch.distributed.

* The launcher: `launch(command, spec)` runs `kd2edge <command>` in `spec.num_processes`
  processes through accelerate's launcher (`accelerate launch`), in this process, and returns
  the exit code of the process that failed first. kd2edge uses accelerate's `--multi_gpu`
  launcher (torchrun) on every machine: `accelerate launch --cpu --num_processes N` starts
  ONE process unless MPI is set up (accelerate's CPU path is `mpirun --hostfile`), while under
  torchrun kd2edge's processes pick the gloo backend themselves when there is no CUDA device.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kd2edge.errors import ConfigError, ResourceError

TIMEOUT_ENV = "KD2EDGE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 6 * 3600   # a barrier waits this long for the slowest process (teacher pass, scoring)


def world_size_from_env() -> int:
    """The number of processes a launcher started (WORLD_SIZE, set by torchrun); 1 outside a launcher."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_secondary_process() -> bool:
    """True in every launched process but the main one (RANK > 0): its CLI prints errors only.

    Reads the environment only, so the CLI can ask before importing torch.
    """
    try:
        return int(os.environ.get("RANK", "0")) > 0
    except ValueError:
        return False


def timeout_s() -> float:
    """How long a collective step waits for the slowest process (KD2EDGE_DIST_TIMEOUT_S, default 6 h).

    Raises:
        ConfigError: the variable is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds: set it to e.g. 21600")
    return value


def use_cpu() -> bool:
    """Whether the processes run on CPU (no CUDA device, or ACCELERATE_USE_CPU set): gloo, not nccl."""
    import torch

    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def _state():
    """accelerate's process state, created once with kd2edge's timeout (later Accelerators reuse it)."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=use_cpu(), timeout=timedelta(seconds=timeout_s()))


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launched ones, and the collective steps the distill stage uses.

    Every method is a plain call with one process (world 1), so the stage reads the same either way.
    Every collective method must be called by all processes, in the same order.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.world > 1:
            _state().wait_for_everyone()

    def broadcast(self, value: Any) -> Any:
        """The main process's `value` (picklable), on every process."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every process's `value` (picklable), in rank order, on every process."""
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return list(gather_object([value]))

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of `values` over processes (float64), on every process."""
        if self.world == 1:
            return list(values)
        import torch
        from accelerate.utils import reduce

        total = reduce(torch.tensor(values, dtype=torch.float64, device=_state().device), reduction="sum")
        return total.cpu().tolist()

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on the main process, then on the others: the main one computes and caches, they read."""
        if self.is_main:
            out = fn()
            self.barrier()
            return out
        self.barrier()
        return fn()

    def check_shared(self, folder: Path) -> None:
        """Check that every process sees `folder` as the main one wrote it (one filesystem).

        The checkpoint and the teacher's cached logits are written once, by the main process,
        and read by all: on several machines the run folder must be on a shared filesystem.

        Raises:
            ResourceError: some process does not see the main process's file.
        """
        if self.world == 1:
            return
        probe = Path(folder) / ".launch-probe"
        token = None
        if self.is_main:
            token = uuid.uuid4().hex
            probe.write_text(token)
        token = self.broadcast(token)
        seen = probe.is_file() and probe.read_text().strip() == token
        everyone = self.gather((seen, socket.gethostname()))
        blind = [f"{host} (rank {r})" for r, (ok, host) in enumerate(everyone) if not ok]
        if blind:
            raise ResourceError(f"{', '.join(blind)} cannot see {folder} as the main process wrote it: put --out "
                                f"(and --teacher-cache) on a filesystem every machine mounts at the same path")


def ranks() -> Ranks:
    """This process's `Ranks`: one process outside a launcher, else accelerate's view of the group."""
    if world_size_from_env() == 1:
        return Ranks()
    import torch.distributed as dist

    state = _state()
    return Ranks(state.process_index, state.num_processes, state.local_process_index, str(dist.get_backend()))


# ---------------------------------------------------------------------------------------------
# The launcher side.

@dataclass(frozen=True)
class Launch:
    """How to start a command's processes: `accelerate launch` arguments, named as kd2edge's flags."""

    num_processes: int                       # over all machines (accelerate's convention)
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None     # None: a free port on one machine, 29500 across machines
    config_file: str | None = None           # an accelerate config (e.g. kd2edge/accelerate/fsdp.yaml)


def launch_spec(num_processes: int | None, num_machines: int | None = None, machine_rank: int | None = None,
                main_process_ip: str | None = None, main_process_port: int | None = None,
                config_file: str | None = None) -> Launch | None:
    """The launch the CLI flags ask for, or None to run in this process.

    Raises:
        ConfigError: inconsistent flags (machine flags without --num-processes, processes not divisible
            over machines, a second machine without the main one's address, or flags given inside a
            process a launcher already started).
    """
    machine_flags = {"--num-machines": num_machines, "--machine-rank": machine_rank,
                     "--main-process-ip": main_process_ip, "--main-process-port": main_process_port,
                     "--accelerate-config": config_file}
    given = [flag for flag, value in machine_flags.items() if value is not None]
    if num_processes is None:
        if given:
            raise ConfigError(f"{', '.join(given)} need --num-processes (the number of processes over all machines)")
        return None
    if world_size_from_env() > 1:
        raise ConfigError(f"this process was already started by a launcher (WORLD_SIZE={world_size_from_env()}): "
                          "drop --num-processes, or run kd2edge without `accelerate launch`")
    machines = num_machines or 1
    problems = []
    if num_processes % machines:
        problems.append(f"--num-processes {num_processes} is the total over all machines and must be a multiple "
                        f"of --num-machines {machines}")
    if machines > 1 and not main_process_ip:
        problems.append("--num-machines > 1 needs --main-process-ip (the address of the machine with rank 0)")
    if machine_rank is not None and not 0 <= machine_rank < machines:
        problems.append(f"--machine-rank {machine_rank} must lie in 0..{machines - 1}")
    if problems:
        raise ConfigError(problems, source="launch")
    if num_processes == 1 and machines == 1 and config_file is None:
        return None
    return Launch(num_processes, machines, machine_rank or 0, main_process_ip, main_process_port, config_file)


def accelerate_args(spec: Launch, cpu: bool, cpu_cores: int | None = None) -> list[str]:
    """The `accelerate launch` arguments (before `-m kd2edge.cli ...`) for `spec`.

    Args:
        spec: the launch.
        cpu: no CUDA device here: each process gets its share of the CPU cores as threads.
        cpu_cores: the cores to share (default: this machine's).
    """
    args = ["--config_file", spec.config_file] if spec.config_file else ["--multi_gpu"]
    args += ["--num_processes", str(spec.num_processes), "--num_machines", str(spec.num_machines),
             "--machine_rank", str(spec.machine_rank), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if spec.main_process_ip:
        args += ["--main_process_ip", spec.main_process_ip]
    port = spec.main_process_port
    if port is None:
        port = 0 if spec.num_machines == 1 else 29500   # 0: accelerate picks a free port
    args += ["--main_process_port", str(port)]
    if cpu:
        local = max(1, spec.num_processes // spec.num_machines)
        args += ["--num_cpu_threads_per_process", str(max(1, (cpu_cores or os.cpu_count() or 1) // local))]
    return args


def launch(command: list[str], spec: Launch) -> int:
    """Run `python -m kd2edge.cli <command>` in `spec.num_processes` processes (this machine's share)
    through accelerate's launcher, and wait for them.

    Args:
        command: the kd2edge command line without the launch flags, e.g. ["distill", "--out", "x"].
        spec: the launch.

    Returns:
        0, or the exit code of the process that failed first (its one-line error is already printed).

    Raises:
        Interrupted: the launcher was stopped by a signal (the processes are stopped with it).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from kd2edge.errors import Interrupted

    parser = launch_command_parser()
    args = parser.parse_args([*accelerate_args(spec, cpu=use_cpu()), "-m", "kd2edge.cli", *command])
    try:
        launch_command(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    except SignalException as e:
        raise Interrupted(f"stopped by signal {e.sigval.name}") from None
    return 0
