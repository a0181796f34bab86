"""Does the launch match what its command line asked for: the number of processes, and the
DeepSpeed config its launch config names (docs/cli.md)."""

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


def _parsed_launch(argv: list[str]):
    """The `accelerate launch` arguments of `argv`, parsed; None when it is no (parsable) launch."""
    args = _launch_args(argv)
    if args is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        return launch_command_parser().parse_known_args(args)[0]
    except (SystemExit, Exception):  # an unparsable line: nothing to compare
        return None


def requested_processes(argv: list[str]) -> int | None:
    """How many processes the `accelerate launch` command line `argv` asks for (flag, else its
    config file, else Accelerate's default config file, else 1); None when `argv` is not one."""
    parsed = _parsed_launch(argv)
    if parsed is None:
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


def resolve_deepspeed_config(argv: list[str] | None = None, env: dict | None = None) -> None:
    """Point Accelerate at the DeepSpeed JSON a launch config names relative to the checkout
    (launch/accelerate_deepspeed_zero2.yaml: launch/deepspeed_zero2.json) when the launch runs
    elsewhere: found beside that launch config or one folder up, else one line saying so."""
    env = os.environ if env is None else env
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not path or path == "none" or os.path.isabs(path) or os.path.isfile(path):
        return
    parsed = _parsed_launch(parent_argv() if argv is None else argv)
    launch_config = getattr(parsed, "config_file", None)
    if launch_config:
        here = Path(launch_config).resolve().parent
        for folder in (here, here.parent):
            if (folder / path).is_file():
                env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(folder / path)
                return
    named = f" (deepspeed_config_file of {launch_config})" if launch_config else ""
    raise LaunchMismatch(f"DeepSpeed config {path}{named}: no such file from {os.getcwd()} or beside the launch "
                         "config; launch from the folder it is relative to, or give its absolute path")
