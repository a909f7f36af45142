"""The GPU proof's CPU mode runs end to end, so the script that needs a GPU never rots between GPU runs."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, run_env


@pytest.mark.e2e
def test_gpu_proof_cpu_mode_runs_every_part(tmp_path):
    from benchmarks.gpu_proof import CELL_NAMES, CPU_CELLS, PARTS

    out = tmp_path / "proof"
    # without the rendezvous variables of this process's own process group (its port is taken)
    env = {**run_env(), "PYTHON": sys.executable}
    # WHEEL_DIR "-": everything imports here, so nothing is installed
    proc = subprocess.run(["bash", "benchmarks/gpu_proof.sh", "-", str(out), "--cpu", "--budget", "1200"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_proof.json").read_text())
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        if CPU_CELLS.get(name):  # a cell whose code path another cell runs
            assert part == {"skipped": f"CPU mode: the code path of {CPU_CELLS[name]}"}
            continue
        assert "error" not in part and "skipped" not in part, (name, part)
        assert part["seconds"] > 0
        if name in CELL_NAMES:
            assert part["img_per_s"] > 0 and part["tokens_per_s"] > 0, name
        else:
            assert part["checks"], name
    # the correctness checks hold on the CPU too (bf16 DeepSpeed, aot_eager, the device view on the CPU)
    for name in ("zero_stages", "compile", "gpu_decode"):
        assert all(c.startswith("PASS") for c in report["parts"][name]["checks"]), report["parts"][name]["checks"]
    # every method ran: five losses, or the error it raised
    runs = report["parts"]["methods"]["runs"]
    assert set(runs) == {"mae", "hpm", "mapet", "digpt", "mlo_mae", "moco_v3", "dino", "simclr", "mae_compressed",
                         "moco_v3_compressed"}
    assert all(len(r.get("losses", [])) == 5 or r.get("error") for r in runs.values()), runs
    assert len(report["parts"]["methods"]["checks"]) == len(runs)
    # the targets are checked (meaningless numbers on the CPU, but the code path runs)
    checks = " ".join(report["checks"])
    for target in ("engine overhead vit_l16 mae zero1", "MAE ViT-L engine", "DINO ViT-L/16", "data path, GPU decode",
                   "MoCo v3 ViT-L step time", "train.pretrain MAE ViT-B"):
        assert target in checks, target
    table = (out / "gpu_proof.md").read_text()
    assert "| mae_compiled |" in table and "(target" in table and "PASS" in table
    cells = json.loads((out / "step_cells.json").read_text())
    assert {c["backend"] for c in cells} == {"plain", "zero1", "zero3"}
