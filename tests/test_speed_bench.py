"""The speed benchmark script runs end to end (a smoke run: its numbers are not checked here --
performance is measured by the script, not asserted in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--configs", "1", "--quick",
           "--methods", "vectorfit,lora", "--steps", "1", "--memory-steps", "1",
           "--no-setup", "--no-inference", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `vectorfit` sets it: spinning threads on a busy machine
    # made this smoke run's SVDs ~100x slower (5 s for a 384 x 384 matrix)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "1-minilm-seqcls-32x64-fp32.json").read_text())
    # (two methods: each one costs a memory child process; low-memory mode's equality with the
    # default is tested in test_speed_paths.py and test_recipes_cli.py)
    methods = ["vectorfit", "lora"]
    assert res["methods"] == methods
    for m in methods:
        assert res["memory"][m]["peak_mb"] > 0, res["memory"][m]
        assert res["step"][m]["train"]["n"] == 1 and res["step"][m]["eval"]["n"] == 1
        assert f"step_train_{m}_over_lora" in res["ratios"] and f"peak_mem_{m}_over_lora" in res["ratios"]
        if m != "lora":  # one round: the round-by-round ratio is the ratio of the two raw times
            q = res["ratios"][f"step_train_{m}_over_lora_paired_quartiles"]
            assert q == [res["step"][m]["train"]["raw_s"][0] / res["step"]["lora"]["train"]["raw_s"][0]] * 3
    assert res["trainable_params"]["vectorfit"] == 35_330  # minilm: sigma + bias vectors and the 2-class head
    assert "peak MB" in proc.stdout
