"""Stop requests: SIGTERM (a cluster's pre-emption warning, forwarded by srun and torchrun),
SIGINT (Ctrl-C) or SIGUSR1 become a flag; at the next step boundary every rank learns whether
any rank got one (one all-reduce), so all of them save the same checkpoint and stop together.
A third signal interrupts at once. See docs/checkpoints.md#pre-emption.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; the message says how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Context manager: while inside, the signals above are recorded instead of acted on."""

    def __init__(self):
        self.signum, self.count, self._old = 0, 0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.signum = self.signum or signum
        if self.count >= 3:  # the first two may be the terminal's and the launcher's copy of one Ctrl-C
            raise KeyboardInterrupt

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none), the same on every rank: every rank calls it at the same step."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())  # the step already waits for its loss on the host: no extra stall


    def checkpoint_if_asked(self, device: torch.device, save, step: int, ckpt_dir) -> None:
        """At a step boundary, on every rank: when any rank got a signal, `save()` and raise `TrainingStopped`."""
        signum = self.agreed(device)
        if signum:
            save()
            raise TrainingStopped(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in {ckpt_dir}; "
                                  "continue with train.resume=auto (on any number of ranks that divides the global "
                                  "batch)", signum)
