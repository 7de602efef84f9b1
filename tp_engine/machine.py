"""What machine a figure was measured on: host, cores, CPU model, BLAS, the kernel it chose and
its thread setting, NumPy and Python versions. Used by the results records and the benchmarks."""
from __future__ import annotations

import os
import platform

import numpy as np


def describe() -> dict[str, str]:
    blas = "unknown"
    try:  # numpy >= 2 describes its build as dicts
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{info.get('name', '?')} {info.get('version', '')}".strip()
    except Exception:
        pass
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    # OpenBLAS picks its float32 matmul kernel by CPU (e.g. SkylakeX with AVX-512, Haswell with
    # AVX2); the kernels sum dot products in different orders, so the same seed can move the last
    # digits of a result from one CPU to another. Naming it says when two runs are comparable.
    kernel = "unknown"
    try:
        from threadpoolctl import threadpool_info

        kernel = next((i.get("architecture") or "?" for i in threadpool_info() if i.get("user_api") == "blas"), kernel)
    except Exception:
        pass
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    return {"host": platform.node(), "cpus": str(os.cpu_count()), "cpu": cpu, "blas": blas, "blas_kernel": kernel,
            "threads": threads, "numpy": np.__version__, "python": platform.python_version()}
