"""The Triton kernels' logic on the CPU in CI: the interpreter-only tests (MoE layer and routing, decode
attention's splits, merges and early key loads, the batch-1 qkv matmul's heads, the few-rows matmul and its
epilogues, the fused sampling kernels) run in one child pytest with TRITON_INTERPRET=1, which Triton reads when
the kernels are defined, so this process (whose kernels are compiled ones) cannot run them itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

TESTS = Path(__file__).parent
INTERPRETED = ["test_fused_moe.py", "test_attention_interpreted.py", "test_skinny_interpreted.py", "test_rows_interpreted.py",
               "test_sampling_interpreted.py", "test_prefetch_interpreted.py"]


def test_kernels_pass_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # not the gpu-marked tests: on a GPU machine they would run their CUDA tensors through the interpreter
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *INTERPRETED],
                          cwd=TESTS, env=env, capture_output=True, text=True, timeout=280)
    tail = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 77, tail  # the interpreter tests ran, not only the CPU ones
