"""The stability report's comparison, on small fake reports (the pipeline runs are not repeated)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("stability", ROOT / "benchmarks" / "stability.py")
stability = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stability)


def write(root: Path, rel: str, obj) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(json.dumps(obj))


def test_numbers_inside_intervals_and_verdicts_that_hold(tmp_path, monkeypatch):
    committed, variant = tmp_path / "committed", tmp_path / "blas"
    key = "malicious_mask_hit_rate_protected"
    write(committed, "reports/metrics.json", {key: 0.2, f"{key}_low": 0.1, f"{key}_high": 0.4})
    write(variant, "reports/metrics.json", {key: 0.5})
    verdicts = [
        {"id": "a", "verdict": "higher"},
        {"id": "b", "verdict": "no difference"},
        {"id": "c", "verdict": "lower"},
    ]
    write(committed, "reports/conclusions.json", verdicts)
    write(
        variant,
        "reports/conclusions.json",
        [
            {"id": "a", "verdict": "higher"},
            {"id": "b", "verdict": "higher"},
            {"id": "c", "verdict": "no difference"},
        ],
    )
    monkeypatch.setattr(stability, "ROOT", committed)
    result = stability.compare_runs({"blas": variant})
    (row,) = result["numbers"]
    assert row["committed"] == 0.2 and row["blas"] == 0.5 and row["blas_inside"] is False
    by_id = {c["id"]: c for c in result["conclusions"]}
    assert by_id["a"]["stated"] and by_id["a"]["blas"] == "higher"
    assert not by_id["b"]["stated"] and by_id["c"]["blas"] == "no difference"
    text = stability.markdown(result, {"blas": 12.0})
    assert "2 directional conclusions are stated" in text and "blas: 1 of 2 hold" in text
    assert (
        "0.500 (outside)" in text
        and "| reports/conclusions.json | `b` | no difference | higher |" in text
    )
