"""The dcgan's noise projection as a transposed conv (before) and as a matmul (after), in one run:
ONNX Runtime on the exported graph (the head a Conv over 4x4 zero padding before) and eager torch
(BatchNorm folded, channels_last; the head a ConvTranspose2d before), the whole
generator and the layer alone, img/s medians of interleaved rounds, plus the largest difference.

    .venv/bin/python benchmarks/bench_projection.py [--checkpoint PATH] [--batch-sizes 64,256] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from interleave import median_rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a dcgan checkpoint [default: fresh weights with random BatchNorm stats]")
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()

    import onnxruntime as ort

    from gantk import models
    from gantk.checkpoint import generator_from, load
    from gantk.exporters import fold
    from gantk.exporters.onnx import DEFAULT_OPSET, _trace

    torch.set_num_threads(a.threads)
    g = generator_from(load(a.checkpoint)) if a.checkpoint else _random_dcgan(models)
    folded = fold.fold_batchnorm(g)
    before = fold.stride1_as_conv(folded)      # as exported before: the head a Conv
    after = fold.for_inference(g, convs="all")  # as exported now: the head a Linear
    assert isinstance(after.net[0], models.Projection)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("conv head", before), ("matmul head", after)):
            path = Path(tmp) / f"{name}.onnx"
            path.write_bytes(_trace(m, g.latent_shape, DEFAULT_OPSET).SerializeToString())
            sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    eager = {"conv head": _channels_last(folded), "matmul head": fold.channels_last(g, dtype="fp32")}
    heads = {"conv head": folded.net[0], "matmul head": after.net[0]}

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {a.threads} thread(s), "
          f"medians of {a.rounds} interleaved rounds")
    for b in map(int, a.batch_sizes.split(",")):
        z = torch.randn(b, *g.latent_shape)
        zn = z.numpy()
        with torch.inference_mode():
            ref = g.eval()(z).numpy()
            runs = {}
            for name in sessions:
                s, m, h = sessions[name], eager[name], heads[name]
                diff = max(np.abs(s.run(None, {"z": zn})[0] - ref).max(), np.abs(m(z).numpy() - ref).max())
                print(f"batch {b:>4} {name:<12} max |diff| against the eager generator {diff:.1e}")
                runs[("onnxruntime", name)] = lambda s=s: (s.run(None, {"z": zn}), b)[1]
                runs[("torch channels_last", name)] = lambda m=m: (m(z), b)[1]
                runs[("the layer alone (torch)", name)] = lambda h=h: (h(z), b)[1]
            rates = median_rates(runs, rounds=a.rounds)
        for route in dict.fromkeys(r for r, _ in rates):
            conv, matmul = rates[(route, "conv head")], rates[(route, "matmul head")]
            print(f"batch {b:>4} {route:<24} conv head {conv:>9,.0f} img/s   matmul head {matmul:>9,.0f} img/s   "
                  f"x{matmul / conv:.3f}")


def _random_dcgan(models):
    torch.manual_seed(0)
    g = models.dcgan_generator()
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return g.eval()


def _channels_last(folded):
    """fold.channels_last(g, dtype="fp32") as it was before the projection rewrite."""
    from gantk.exporters import fold

    body = torch.nn.Sequential(*folded.net).to(memory_format=torch.channels_last)
    return fold._float_edges(torch.nn.Sequential(), body, torch.float32, folded.latent_shape)


if __name__ == "__main__":
    main()
