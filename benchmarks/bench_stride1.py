"""Which of the seed generator's stride-1 transposed convs should be exported as padded convs, in one run:
each layer alone (transposed conv + ReLU, as ConvTranspose or as the equivalent Conv with padding k-1)
and the whole generator with the rewrite applied to all layers, to none, or to the "thin" ones (one input
or output channel: what the TorchScript export does), in ONNX Runtime and in TorchScript, at 1 and 2
threads. img/s medians of interleaved rounds; GFLOP/s of the layers count the useful taps only.

    .venv/bin/python benchmarks/bench_stride1.py [--checkpoint PATH] [--batch 256] [--threads 1,2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from interleave import median_rates
from torch import nn

RULES = ("all", "none", "thin")  # fold.for_inference's `convs`


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a seed checkpoint [default: fresh weights]")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    warnings.simplefilter("ignore")  # torch.jit's and torch.onnx's deprecation notices

    import onnxruntime as ort

    from gantk import models
    from gantk.checkpoint import generator_from, load
    from gantk.exporters import fold

    torch.manual_seed(0)
    g = generator_from(load(a.checkpoint)) if a.checkpoint else models.seed_generator()
    g = g.eval().requires_grad_(False)
    base = fold.projection_as_linear(fold.fold_batchnorm(g))
    z = torch.randn(a.batch, *g.latent_shape)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, batch {a.batch}, "
          f"medians of {a.rounds} interleaved rounds")
    for threads in map(int, a.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s): each layer alone, ConvTranspose against the padded Conv")
        x = z
        for m in (m for m in base.net if isinstance(m, nn.ConvTranspose2d)):
            layer = {"convT": nn.Sequential(m, nn.ReLU()), "conv": nn.Sequential(fold._as_conv(m), nn.ReLU())}
            runs = _runs(layer, x, threads, ort)
            rates = median_rates(runs, rounds=a.rounds)
            flops = 2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * x.shape[2] * x.shape[3]
            print(f"  {m.in_channels:>3} -> {m.out_channels:<3} on {x.shape[2]}x{x.shape[3]:<3}" + "".join(
                f"  {engine} convT {rates[(engine, 'convT')] * flops / 1e9:5.1f} conv "
                f"{rates[(engine, 'conv')] * flops / 1e9:5.1f} GFLOP/s (convT x{rates[(engine, 'convT')] / rates[(engine, 'conv')]:.2f})"
                for engine in ("onnxruntime", "torchscript")))
            with torch.inference_mode():
                x = m(x)
        print(f"{threads} thread(s): the whole generator, stride-1 layers rewritten as convs")
        whole = {rule: fold.for_inference(g, convs=rule) for rule in RULES}
        with torch.inference_mode():
            ref = g(z).numpy()
            for name, m in whole.items():
                assert np.abs(m(z).numpy() - ref).max() < 1e-4, name
        rates = median_rates(_runs(whole, z, threads, ort), rounds=a.rounds)
        for engine in ("onnxruntime", "torchscript"):
            print(f"  {engine:<12}" + "".join(f"  {name} {rates[(engine, name)]:>6,.0f} img/s" for name in RULES)
                  + f"   thin/all x{rates[(engine, 'thin')] / rates[(engine, 'all')]:.2f}"
                  + f"   none/all x{rates[(engine, 'none')] / rates[(engine, 'all')]:.2f}")


def _runs(modules: dict, x: torch.Tensor, threads: int, ort) -> dict:
    """(engine, name) -> a call that runs the module on x and returns the batch size."""
    import io

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    xn, b = x.numpy(), len(x)
    runs = {}
    for name, m in modules.items():
        buf = io.BytesIO()
        torch.onnx.export(m, x[:1], buf, input_names=["x"], output_names=["y"], opset_version=20, dynamo=False,
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        s = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        ts = torch.jit.freeze(torch.jit.script(m.eval()))
        runs[("onnxruntime", name)] = lambda s=s: (s.run(None, {"x": xn}), b)[1]
        runs[("torchscript", name)] = lambda ts=ts: (_no_grad(ts, x), b)[1]
    return runs


def _no_grad(m, x):
    with torch.inference_mode():
        return m(x)


if __name__ == "__main__":
    main()
