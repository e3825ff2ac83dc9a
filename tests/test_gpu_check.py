"""benchmarks/gpu_check.sh runs end to end (here on the CPU with tiny timm models) and prints what it promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _half_unit(printed: str) -> float:
    """Half a unit of the last digit a number was printed with: the most its rounding moved it."""
    decimals = len(printed.partition(".")[2])
    return 0.5 * 10.0**-decimals


def test_gpu_check_runs_end_to_end_on_the_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_STUDENT": "resnet10t", "GPU_CHECK_TEACHER": "test_vit",
           "GPU_CHECK_IMAGE_SIZE": "32", "GPU_CHECK_BATCH": "8", "GPU_CHECK_WARMUP": "1", "GPU_CHECK_STEPS": "2", "GPU_CHECK_CLASSES": "10"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"torch {__import__('torch').__version__}; device cpu" in out
    assert "student resnet10t, teacher test_vit, 32 px, batch 8, 10 classes, 1 warm-up + 2 timed steps per mode" in out
    assert "amp=True amp_frozen=True channels_last=auto (student: off) prefetch=auto compile=False" in out
    rates = {}
    for mode in ("plain", "kl_dp cached", "kl_dp online"):
        line = re.search(rf"^{mode} +([\d.]+) images/s  ratio to plain ([\d.]+)  peak GPU memory n/a \(CPU\)$", out, re.M)
        assert line, f"no line for {mode} in:\n{out}"
        rates[mode] = float(line[1]), float(line[2]), _half_unit(line[1]), _half_unit(line[2])
    assert rates["plain"][1] == 1.0
    for mode in ("kl_dp cached", "kl_dp online"):  # the printed ratio is the printed rates' quotient
        rate, ratio, rate_rounding, ratio_rounding = rates[mode]
        plain, plain_rounding = rates["plain"][0], rates["plain"][2]
        # each printed number is rounded: the quotient of two rounded rates can differ from the printed ratio by their relative rounding
        tolerance = ratio_rounding + ratio * (rate_rounding / rate + plain_rounding / plain) + 1e-9
        assert abs(ratio - rate / plain) <= tolerance
    assert re.search(r"^goal kl_dp cached >= 0.95 of plain: (met|not met) \([\d.]+\)$", out, re.M)
    for mode in ("plain", "kl_dp cached", "kl_dp online"):
        assert f"host-device syncs per step, {mode}: n/a (CPU)" in out
    assert re.search(r"^peak resident memory of the process [\d.]+ GiB$", out, re.M)
