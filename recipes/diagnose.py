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
from peft_tensor.training.config import run_recipe
from peft_tensor.training.schema import ConfigError, validate_config
from peft_tensor.analysis.diagnosis import diagnose, merge_volumes, read_csv_rows, synthetic_metadata

DEFAULT_CONFIG = "diagnose_synthetic"


def main(cfg: dict) -> dict:
    cfg = validate_config(cfg, "diagnose")  # defaults filled in (peft_tensor.training.schema.DiagnoseConfig)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if cfg["synthetic"]:
        rows = synthetic_metadata(int(cfg["n_per_group"]), int(cfg["seed"]))
        write_rows_csv(out / "synthetic_metadata.csv", rows)
        print("SYNTHETIC metadata and volumes (made up to exercise the pipeline; not ADNI, not real subjects)")
    else:
        if not cfg["metadata"]:
            raise ConfigError("metadata: required unless synthetic: true (a CSV of subjects)")
        rows = read_csv_rows(cfg["metadata"])
        if cfg["volumes"]:
            rows = merge_volumes(rows, read_csv_rows(cfg["volumes"]))
    tasks = [tuple(t) for t in cfg["tasks"]]
    result = diagnose(rows, tasks, list(cfg["features"]), int(cfg["folds"]), int(cfg["seed"]), float(cfg["l2"]))
    result = {"synthetic": bool(cfg["synthetic"]), "features": cfg["features"], "tasks": result}
    write_json(out / "diagnosis.json", result)
    for name, r in result["tasks"].items():
        if "error" in r:
            print(f"{name}: {r['error']}")
        else:
            print(f"{name}: accuracy {r['accuracy']:.3f} ± {r['accuracy_std']:.3f}, balanced "
                  f"{r['balanced_accuracy']:.3f} ({r['folds']}-fold CV, n={r['n']})")
    return result


if __name__ == "__main__":
    run_recipe(main, description=__doc__, default_config=DEFAULT_CONFIG, schema="diagnose")
