"""bench/flux_gpu.py's --tiny smoke: every dfk8s case runs, each in its own process, and the next "pod"
(warm-start: a new process with an empty inductor cache) starts from the compile cache the first published.
The figures themselves mean nothing on a CPU; the GPU run is in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "flux_gpu.py"


def test_the_flux_benchmark_runs_every_case_and_the_warm_start_loads_the_compile_cache(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(BENCH), "--tiny", "--iterations", "1", "--images", "4",
                             "--cases", "eager,fast,warm-start,fp8", "--json", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results["eager"]["compile"] is False and results["eager"]["images_per_second"] > 0
    assert results["fast"]["compile_report"]["worker"] == "compiled"
    warm = results["warm-start"]["compile_report"]
    assert warm["worker"] == "cache" and warm["graphs_compiled"] == 0 and warm["graphs_loaded"] > 0, warm
    assert results["warm-start"]["ratio_over_eager"] > 0
    assert results["fp8"]["error"].startswith("unavailable: --fp8 needs")
    assert "warm-start" in result.stdout and "s/image" in result.stdout
