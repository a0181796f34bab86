"""launch/slurm_train.sbatch without a cluster: fake srun/scontrol/accelerate on PATH. On SLURM's
pre-emption warning (USR1 to the batch script) every rank gets SIGTERM, the script waits for the
checkpoint, then requeues the job; the requeued command resumes (train.resume=auto)."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "slurm_train.sbatch"

FAKES = {
    # srun: drop its own options, run the task command (one node)
    "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/usr/bin/env bash\nif [ "$1" = show ]; then echo node1; else echo "$*" >> "$FAKE_LOG/scontrol"; fi\n',
    # the launcher: record its arguments, say it runs, checkpoint and exit 143 on SIGTERM
    "accelerate": ('#!/usr/bin/env bash\necho "$*" > "$FAKE_LOG/args"\n'
                   'trap \'echo saved > "$FAKE_LOG/checkpoint"; exit 143\' TERM\n'
                   'touch "$FAKE_LOG/running"\nwhile true; do sleep 0.05; done\n'),
}


def test_sbatch_header_asks_for_a_warning_and_requeue_and_logs_where_slurm_can_write():
    header = [ln for ln in SCRIPT.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --requeue" in header
    for script in (SCRIPT, REPO / "launch" / "slurm_eval.sbatch"):
        out = next(ln for ln in script.read_text().splitlines() if ln.startswith("#SBATCH --output="))
        assert "/" not in out.split("=", 1)[1].split()[0]  # SLURM creates no folders: the submission folder itself


def test_warning_signal_checkpoints_every_rank_then_requeues(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "GPUS_PER_NODE": "2"}
    proc = subprocess.Popen(["bash", str(SCRIPT), "configs/street360loc.yaml", "train.epochs=3"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S  # a guard against a hang, not a measurement
        while not (log / "running").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends to the batch script
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:  # nothing of the fake job outlives the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert (log / "checkpoint").read_text().strip() == "saved"  # the ranks got SIGTERM and were waited for
    assert (log / "scontrol").read_text().split() == ["requeue", "77"]
    args = (log / "args").read_text()
    assert "--num_processes 2" in args and "train.resume=auto train.epochs=3" in args
    assert "requeueing job 77" in out
