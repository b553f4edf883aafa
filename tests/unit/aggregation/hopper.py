"""Triton kernels compiled for an H100/H200 (sm_90) on any machine, GPU or not: Triton's interpreter,
which the CPU tests run the kernels under, does not run Triton's compiler, and the compiler refuses
some Python that the interpreter accepts. The NVIDIA backend of the Triton wheel brings ``ptxas``
and ``cuobjdump``; without them the tests that use this are skipped."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from algorithms.aggregation import row_kernels

triton = row_kernels.triton
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" if triton is not None else None
needs_hopper_compiler = pytest.mark.skipif(
    TOOLS is None or not (TOOLS / "ptxas").exists() or not (TOOLS / "cuobjdump").exists(),
    reason="Triton without its NVIDIA backend's ptxas and cuobjdump")


def compile_for_hopper(kernel: Any, signature: dict[str, str], constants: dict[str, Any], tmp_path: Path,
                       num_warps: int = 4) -> str:
    """``kernel`` compiled for sm_90 (``signature``: Triton's types of the runtime arguments;
    ``constants``: the constexpr ones), and cuobjdump's resource usage of it (registers, ``LOCAL``
    bytes: spills)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert TOOLS is not None
    source = ASTSource(fn=kernel, signature=signature | {name: "constexpr" for name in constants}, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    return subprocess.run([str(TOOLS / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
