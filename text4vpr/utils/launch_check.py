"""Did the launcher start as many processes as were asked for?

`accelerate launch --cpu --num_processes 2 train.py` takes Accelerate's single-process path
(any `--cpu` does) and starts ONE process without a word. The launcher exports nothing that
says how many were requested, so we read its command line (our parent process) and config
file, and compare with the world size that torchrun/Accelerate actually set up.
"""

from __future__ import annotations

import os
from pathlib import Path

from text4vpr.utils.errors import InputError

CPU_FIX = ("on CPU use `accelerate launch --config_file launch/accelerate_cpu_2proc.yaml` (edit num_processes), "
           "`accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`, "
           "with train.cpu=true")


class LaunchMismatch(InputError, RuntimeError):
    """The launcher started fewer (or more) processes than its command line asked for."""


def parent_argv(pid: int | None = None) -> list[str]:
    """The command line of process `pid` (default: our parent), [] where unreadable."""
    pid = os.getppid() if pid is None else pid
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _launch_args(argv: list[str]) -> list[str] | None:
    """The arguments after `accelerate ... launch` in `argv`, None when it is no accelerate launch."""
    for i, a in enumerate(argv):
        if a == "launch" and any("accelerate" in Path(b).name for b in argv[:i]):
            return argv[i + 1:]
        if a.endswith(os.path.join("accelerate", "commands", "launch.py")) or a == "accelerate.commands.launch":
            return argv[i + 1:]
    return None


def requested_processes(argv: list[str]) -> int | None:
    """How many processes the `accelerate launch` command line `argv` asks for (flag, else its
    config file, else Accelerate's default config file, else 1); None when `argv` is not one."""
    args = _launch_args(argv)
    if args is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed = launch_command_parser().parse_known_args(args)[0]
    except (SystemExit, Exception):  # an unparsable line: nothing to compare
        return None
    if parsed.num_processes is not None:
        return int(parsed.num_processes)
    config = parsed.config_file
    if config is None and not parsed.cpu:
        from accelerate.commands.config import default_config_file

        config = default_config_file if os.path.isfile(default_config_file) else None
    if config is None:
        return 1
    import yaml

    try:
        with open(config) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None
    return int(data.get("num_processes", 1) or 1)


def check_world_size(argv: list[str] | None = None, env: dict | None = None) -> None:
    """LaunchMismatch when the launch asked for N processes and the world has another size.

    `argv` is the launcher's command line (default: our parent's), `env` our environment.
    """
    env = os.environ if env is None else env
    argv = parent_argv() if argv is None else argv
    asked = requested_processes(argv)
    if asked is None:
        return
    world = int(env.get("WORLD_SIZE", "1"))
    if asked == world:
        return
    why = " (`--cpu` always takes Accelerate's single-process path)" if world == 1 and "--cpu" in argv else ""
    raise LaunchMismatch(f"accelerate launch asked for {asked} processes but started {world}{why}; {CPU_FIX}")
