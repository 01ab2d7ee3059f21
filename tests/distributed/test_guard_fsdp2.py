"""The divergence guard under FSDP2 on two CPU processes over gloo (see :mod:`tests.distributed.guard_fsdp2_harness`):
the sharded gradients' norm is made whole, so both ranks reach the same verdict."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed.test_two_processes import CPU_DDP, ROOT

pytestmark = pytest.mark.slow


def test_the_guard_sees_the_whole_gradient_norm_of_a_sharded_model_on_every_rank():
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
               "--main_process_port", "0", "-m", "tests.distributed.guard_fsdp2_harness"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert done.stdout.count("guard OK") == 2, done.stdout
