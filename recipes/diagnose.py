"""Hippocampal volume + metadata -> AD vs CN and EMCI vs LMCI, with cross-validated accuracy.

Inputs: a metadata CSV (``id``, ``group`` in CN / EMCI / LMCI / AD, and the covariates named in ``features``,
e.g. ``age``, ``sex``, ``icv_ml``) and a volumes CSV (``id``, ``volume_ml``; what ``evaluate_run`` writes), joined on
``id``. With ``synthetic: true`` the recipe makes up a clearly labelled SYNTHETIC metadata table instead (the
demo of this recipe: not ADNI, not real measurements).

    peft-tensor run diagnose --config diagnose_synthetic
    peft-tensor run diagnose --config diagnose metadata=adni.csv volumes=runs/ft/eval_test/volumes.csv
"""

from __future__ import annotations

from pathlib import Path

from peft_tensor.training import write_json, write_rows_csv
from peft_tensor.training.config import parse_recipe_args
from peft_tensor.analysis.diagnosis import diagnose, merge_volumes, read_csv_rows, synthetic_metadata

DEFAULT_CONFIG = "diagnose_synthetic"


def main(cfg: dict) -> dict:
    out = Path(cfg.get("output_dir", "runs/diagnose"))
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("synthetic"):
        rows = synthetic_metadata(int(cfg.get("n_per_group", 60)), int(cfg.get("seed", 0)))
        write_rows_csv(out / "synthetic_metadata.csv", rows)
        print("SYNTHETIC metadata and volumes (made up to exercise the pipeline; not ADNI, not real subjects)")
    else:
        rows = read_csv_rows(cfg["metadata"])
        if cfg.get("volumes"):
            rows = merge_volumes(rows, read_csv_rows(cfg["volumes"]))
    tasks = [tuple(t) for t in cfg.get("tasks", [["CN", "AD"], ["EMCI", "LMCI"]])]
    result = diagnose(rows, tasks, list(cfg.get("features", ["volume_ml", "age", "sex"])), int(cfg.get("folds", 5)),
                      int(cfg.get("seed", 0)), float(cfg.get("l2", 1.0)))
    result = {"synthetic": bool(cfg.get("synthetic")), "features": cfg.get("features"), "tasks": result}
    write_json(out / "diagnosis.json", result)
    for name, r in result["tasks"].items():
        if "error" in r:
            print(f"{name}: {r['error']}")
        else:
            print(f"{name}: accuracy {r['accuracy']:.3f} ± {r['accuracy_std']:.3f}, balanced "
                  f"{r['balanced_accuracy']:.3f} ({r['folds']}-fold CV, n={r['n']})")
    return result


if __name__ == "__main__":
    main(parse_recipe_args(description=__doc__, default_config=DEFAULT_CONFIG))
