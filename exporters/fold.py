"""Inference rewrites shared by the exporters: BatchNorm folding, the noise projection as a matmul, and
stride-1 ConvTranspose -> Conv.

All are exact in real arithmetic and change float32 results only by rounding (about 1e-7 here).
They work on a deep copy; the generator passed in is left as it was. `channels_last` builds the fast
eager torch path on top of the folding (fp32 or bf16 inside, float32 at the edges).
"""
from __future__ import annotations

import copy


def fold_batchnorm(g):
    """A copy of `g` (eval mode) with every BatchNorm2d merged into the (transposed) conv before it."""
    from torch import nn

    g = copy.deepcopy(g).eval()
    layers = list(g.net)
    out = []
    for layer in layers:
        if out and _foldable(out[-1], layer):
            out[-1] = _merge(out[-1], layer)
        else:
            out.append(layer)
    g.net = nn.Sequential(*out)
    return g.requires_grad_(False)


def _foldable(conv, bn) -> bool:
    """A BatchNorm2d with running statistics and an affine part after a conv whose output channels the
    scale can reach (a grouped transposed conv keeps them per group): others stay BatchNorm layers."""
    from torch import nn

    return (isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.running_var is not None
            and (isinstance(conv, nn.Conv2d) or isinstance(conv, nn.ConvTranspose2d) and conv.groups == 1))


def _merge(conv, bn):
    """conv followed by bn in eval mode, as one conv with a bias."""
    import torch

    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)             # (Cout,)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    merged = copy.deepcopy(conv)
    # Conv2d weight is (Cout, Cin, k, k); ConvTranspose2d weight is (Cin, Cout/groups, k, k).
    shape = (1, -1, 1, 1) if isinstance(conv, torch.nn.ConvTranspose2d) else (-1, 1, 1, 1)
    merged.weight = torch.nn.Parameter(conv.weight * scale.reshape(shape), requires_grad=False)
    merged.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
    return merged


def projection_as_linear(g):
    """A copy of `g` whose first layer, a transposed conv of the 1x1 noise (the dcgan's 100 -> 256x4x4),
    is the equivalent Linear. As a conv it runs over a 4x4 window of zero padding around one pixel;
    as a matmul the layer runs 5-6x faster, the whole generator 5-8% in ONNX Runtime (BENCHMARKS.md)."""
    from torch import nn

    from gantk.models import Projection

    g = copy.deepcopy(g).eval()
    first = g.net[0]
    if tuple(g.latent_shape[1:]) == (1, 1) and _projectable(first):
        g.net = nn.Sequential(Projection.of(first), *list(g.net)[1:])
    return g.requires_grad_(False)


def _projectable(m) -> bool:
    from torch import nn

    return (isinstance(m, nn.ConvTranspose2d) and m.padding == (0, 0) and m.output_padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1)


def stride1_as_conv(g, *, thin_only: bool = False):
    """A copy of `g` where each stride-1 ConvTranspose2d is the equivalent Conv2d; with `thin_only`, only
    those with one input or output channel.

    A stride-1 transposed conv with padding p is a conv with the kernel flipped in both spatial axes,
    its in/out channels swapped, and padding k-1-p. The conv computes the taps on that padding too
    (1.1-2.8x the work on the seed generator's maps), yet onnxruntime's Conv beats its ConvTranspose
    as soon as a session has 2 threads (the seed generator: 1.6-2x; with one thread 0.87-0.93x). torch's
    transposed conv beats the padded conv except where a side has one channel (the seed generator,
    1-2 threads: "thin" 2.2-2.5x "all"). benchmarks/bench_stride1.py, BENCHMARKS.md. Strided transposed
    convs (dcgan) stay as they are.
    """
    from torch import nn

    g = copy.deepcopy(g).eval()
    g.net = nn.Sequential(*[_as_conv(m) if _convertible(m) and (not thin_only or 1 in (m.in_channels, m.out_channels))
                            else m for m in g.net])
    return g.requires_grad_(False)


def _convertible(m) -> bool:
    from torch import nn

    return (isinstance(m, nn.ConvTranspose2d) and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.output_padding == (0, 0) and m.padding_mode == "zeros"
            and all(p <= k - 1 for p, k in zip(m.padding, m.kernel_size)))


def _as_conv(t):
    import torch
    from torch import nn

    k = t.kernel_size
    pad = (k[0] - 1 - t.padding[0], k[1] - 1 - t.padding[1])
    conv = nn.Conv2d(t.in_channels, t.out_channels, k, padding=pad, bias=t.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(t.weight.transpose(0, 1).flip(2, 3))  # (Cout, Cin, k, k)
        if t.bias is not None:
            conv.bias.copy_(t.bias)
    return conv.to(t.weight.device).requires_grad_(False)


def for_inference(g, *, convs: str):
    """BatchNorm folded, the noise projection a matmul, and stride-1 transposed convs rewritten as convs:
    `convs` "all" (the ONNX export), "thin" (one input or output channel: the TorchScript export) or
    "none"."""
    if convs not in ("all", "thin", "none"):
        raise ValueError(f"convs must be 'all', 'thin' or 'none', got {convs!r}")
    g = projection_as_linear(fold_batchnorm(g))
    return g if convs == "none" else stride1_as_conv(g, thin_only=convs == "thin")


def channels_last(g, *, dtype: str = "fp32"):
    """`g` for fast eager inference: BatchNorm folded, the noise projection a matmul, weights in `dtype`
    ("fp32", "bf16" or, on CUDA, "fp16"), channels_last; in reduced precision the first layer (the
    noise projection) stays fp32.

    float32 NCHW noise in, float32 NCHW images out, so it drops in wherever the eager generator runs.
    `gantk bench` measures both. On the 2-core AVX-512 CPU (no AMX): fp32 about 1.1-1.4x eager NCHW,
    bf16 about 2-3x. The first layer holds 2% of the dcgan's FLOPs but, in bf16, moved the trained MNIST
    dcgan's pixels by up to 8 uint8 levels on its own; in fp32 the worst pixel moves 2-3 levels for 7%
    of the speed (benchmarks/bf16_levels.py). The bf16 TorchScript export is this module. The stride-1
    Conv rewrite is not applied: in channels_last it measured no faster in torch.
    """
    import torch

    from gantk.models import Projection

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    folded = projection_as_linear(fold_batchnorm(g))
    layers = list(folded.net)
    # the projection's output is made channels_last with the input of the body, in any dtype
    k = 0 if dtype == "fp32" and not isinstance(layers[0], Projection) else _after_first_layer(layers)
    head = torch.nn.Sequential(*layers[:k])
    body = torch.nn.Sequential(*layers[k:]).to(dtypes[dtype]).to(memory_format=torch.channels_last)
    return _float_edges(head, body, dtypes[dtype], folded.latent_shape)


def _after_first_layer(layers) -> int:
    """Index just past the first conv (or the projection) and the activation that follows it."""
    from torch import nn

    from gantk.models import Projection

    k = next(i for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, Projection))) + 1
    return k + 1 if k < len(layers) and isinstance(layers[k], (nn.ReLU, nn.LeakyReLU)) else k


def _float_edges(head, body, dtype, latent_shape):
    """float32 NCHW at the edges; `head` in float32, then `body` in `dtype` and channels_last (as
    onnx._half_edges does for fp16)."""
    import torch

    class FloatEdges(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.body, self.dtype, self.latent_shape = head, body, dtype, latent_shape

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            x = self.head(z).to(self.dtype).contiguous(memory_format=torch.channels_last)
            return self.body(x).float().contiguous()

    return FloatEdges().eval()
