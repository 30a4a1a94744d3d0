"""onnxruntime CPU graph optimisation levels, and a saved optimised model: session creation time and
img/s (1 intra-op thread, batch 256), interleaved rounds, medians; outputs compared with no optimisation.

    python benchmarks/ort_levels.py --model runs/<run>/export/generator.onnx [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from interleave import median_rates


def main() -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    lv = ort.GraphOptimizationLevel
    levels = {"disable": lv.ORT_DISABLE_ALL, "basic": lv.ORT_ENABLE_BASIC, "extended": lv.ORT_ENABLE_EXTENDED,
              "all": lv.ORT_ENABLE_ALL}

    def options(level, save: Path | None = None):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        if save is not None:
            so.optimized_model_filepath = str(save)
        return so

    def session(path: Path, level):
        return ort.InferenceSession(str(path), options(level), providers=["CPUExecutionProvider"])

    with tempfile.TemporaryDirectory(prefix="gantk-ortlevels-") as tmp:
        saved = Path(tmp) / "optimised-all.onnx"
        ort.InferenceSession(str(a.model), options(levels["all"], saved), providers=["CPUExecutionProvider"])
        configs = {**{n: (a.model, level) for n, level in levels.items()},
                   "saved 'all' model, loaded unoptimised": (saved, lv.ORT_DISABLE_ALL)}
        create: dict = {k: [] for k in configs}
        sessions = {}
        for _ in range(a.rounds):
            for k, (path, level) in configs.items():
                t0 = time.perf_counter()
                sessions[k] = session(path, level)
                create[k].append(time.perf_counter() - t0)
        shape = sessions["disable"].get_inputs()[0].shape[1:]
        z = np.random.default_rng(0).standard_normal((256, *shape), dtype=np.float32)
        ref = sessions["disable"].run(None, {"z": z})[0]
        rates = median_rates({k: lambda s=s: len(s.run(None, {"z": z})[0]) for k, s in sessions.items()},
                             rounds=a.rounds)
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} onnxruntime {ort.__version__}; {a.model}; medians of {a.rounds}")
        for k in configs:
            diff = float(np.abs(sessions[k].run(None, {"z": z})[0] - ref).max())
            print(f"{k:<38} create {1000 * statistics.median(create[k]):6.1f} ms  "
                  f"{rates[k]:7.0f} img/s  max|d| vs unoptimised {diff:.1e}")


if __name__ == "__main__":
    main()
