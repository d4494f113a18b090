"""Research studies and one-off device runs, apart from the benchmarks: the evidence study of the method (its
second and third rounds), bf16 against fp32 on this CPU, and the sessions on a GPU machine. Each writes
``experiments/results/<name>.json`` and ``.md`` with the machine it ran on (in the result files, never in code), and
``experiments/RESULTS.md`` collects them (``benchmarks.run.collect("experiments")``)."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
TITLES = {
    "evidence": "Evidence of the method, second round: m2mKD + fine-tune against training from scratch (Deep "
                "Incubation teacher, NAC and V-MoE, 3 seeds, full data and few labels)",
    "evidence_nac": "Evidence, third round: the NAC with the reference's read-in against the same NAC from scratch "
                    "(3 seeds, full data at equal epochs and equal compute, few labels, dropped and bridged assembly)",
    "precision_nac": "The NAC in bf16 against fp32 on this CPU: module 0's m2mKD, inference, and the whole student at "
                     "the demo's budgets",
    "boundary": "The boundary loss: the assembled student before and after fine-tuning, V-MoE, ViT and NAC, 3 seeds",
    "device_demo": "The demo matrix on a GPU machine: teacher training, students, gates and m2mKD regularisation",
    "precision_demo": "The demo in fp32 and in bf16 on the same seed, at a fifth of the demo's budgets (this CPU)",
    "device_check": "On a GPU machine: the demo in fp32 against bf16, the evidence study's ablations, throughput",
}


def machine_of(source: Path, name: str) -> str:
    """The machine a device session ran on: ``machine.txt`` in its output folder (``device_common.sh`` writes it),
    else the machine the result it replaces names."""
    written = source / "machine.txt"
    if written.is_file():
        return written.read_text().strip()
    import json

    previous = HERE / "results" / f"{name}.json"
    return json.loads(previous.read_text())["meta"]["machine"] if previous.is_file() else "unknown machine"
