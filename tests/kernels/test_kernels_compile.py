"""Every kernel variant the launchers make for a GPU compiles for sm_90 (H100) with Triton's bundled ptxas: the
interpreter runs kernels without the compiler's rules (constexpr reassignment, type unification across
branches), so without a GPU this is what guards the CUDA path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs bench_kernels.py --compile in a subprocess.
pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_variant_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--compile", "--arch", "90"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    compiled = [line for line in run.stdout.splitlines() if " ok " in line]
    kernels = {line.split()[0] for line in compiled}
    assert kernels == {"_adam_kernel", "_adam_multi_kernel", "_epilogue_kernel", "_residual_sumsq_kernel",
                       "_square_sums_kernel", "_update_sumsq_kernel", "_direction_kernel", "_ef_correct_kernel",
                       "_ef_quantize_kernel", "_window_direction_kernel", "_fake_quant_kernel"}
    assert "FAILED" not in run.stdout
