"""onnxruntime int8 (static quantisation, calibrated on gantk noise) against the fp32 export: uint8
levels off and img/s (1 intra-op thread, batch 256, medians of 5 interleaved rounds).

    python benchmarks/int8_ort.py --model runs/<run>/export/generator.onnx
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from interleave import median_rates


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from gantk.generate import noise, to_pixels

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    a = p.parse_args()
    latent = tuple(ort.InferenceSession(str(a.model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[1:])

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"z": noise(1, range(i * 64, (i + 1) * 64), latent)} for i in range(8)])

        def get_next(self):
            return next(self.batches, None)

    variants = {"QDQ s8/s8 per channel": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                                              weight_type=QuantType.QInt8, per_channel=True),
                "QDQ u8/s8": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                                  weight_type=QuantType.QInt8),
                "QOperator u8/s8": dict(quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                                        weight_type=QuantType.QInt8)}
    with tempfile.TemporaryDirectory(prefix="gantk-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(a.model), str(pre))
        files = {"fp32": a.model}
        for name, kw in variants.items():
            files[name] = Path(tmp) / f"{len(files)}.onnx"
            quantize_static(str(pre), str(files[name]), Calibration(), **kw)
        sessions = {k: _session(ort, f) for k, f in files.items()}
        z = noise(0, range(256), latent)
        ref = to_pixels(sessions["fp32"].run(None, {"z": z})[0]).astype(np.int16)
        rates = median_rates({k: lambda s=s: len(s.run(None, {"z": z})[0]) for k, s in sessions.items()}, rounds=5)
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} onnxruntime {ort.__version__}; {a.model}")
        for k, s in sessions.items():
            d = np.abs(to_pixels(s.run(None, {"z": z})[0]).astype(np.int16) - ref)
            ops = sorted({n.op_type for n in onnx.load(str(files[k])).graph.node} - {"Relu", "Tanh"})
            print(f"{k:<24}{rates[k]:7.0f} img/s   max levels {d.max():3d}   "
                  f"pixels off {(d > 0).mean():6.1%}   ops {', '.join(ops)}")


def _session(ort, path: Path):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


if __name__ == "__main__":
    main()
