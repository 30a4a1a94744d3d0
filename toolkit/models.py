"""Generator and discriminator architectures behind a small registry.

Every generator maps noise `z` of its `latent_shape` to images (N, 1, 32, 32) in [-1, 1];
every discriminator maps images to one logit per image, shape (N,).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IMAGE_SHAPE = (1, 32, 32)


class Generator(nn.Module):
    """A feed-forward generator: `net(z)` -> images in [-1, 1]."""

    def __init__(self, net: nn.Sequential, latent_shape: tuple[int, ...]):
        super().__init__()
        self.net = net
        self.latent_shape = tuple(latent_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Projection(nn.Module):
    """A transposed conv applied to a 1x1 input, as the matmul it is: (N, Cin, 1, 1) -> (N, Cout, kh, kw).
    The inference form of a generator's noise projection (exporters/fold.py)."""

    def __init__(self, cin: int, cout: int, kh: int, kw: int, bias: bool):
        super().__init__()
        self.channels, self.height, self.width = cout, kh, kw
        self.linear = nn.Linear(cin, cout * kh * kw, bias=bias)

    @classmethod
    def of(cls, t: nn.ConvTranspose2d) -> "Projection":
        cin, cout, kh, kw = t.weight.shape
        p = cls(cin, cout, kh, kw, t.bias is not None).to(t.weight.device, t.weight.dtype)
        with torch.no_grad():
            p.linear.weight.copy_(t.weight.reshape(cin, -1).t())  # out[o, i, j] = sum_c z[c] W[c, o, i, j]
            if t.bias is not None:
                p.linear.bias.copy_(t.bias.repeat_interleave(kh * kw))
        return p.requires_grad_(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z.flatten(1)).reshape(z.shape[0], self.channels, self.height, self.width)


class Discriminator(nn.Module):
    """`net(x)` -> one logit per image, flattened to (N,)."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(-1)


def _up(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, k, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


def seed_generator() -> Generator:
    """The tutorial's generator: six stride-1 5x5 transposed convs, then a 3x3 one and Tanh."""
    net = nn.Sequential(
        *_up(1, 128, 5),   # (B,128,10,10)
        *_up(128, 64, 5),  # (B,64,14,14)
        *_up(64, 32, 5),   # (B,32,18,18)
        *_up(32, 16, 5),   # (B,16,22,22)
        *_up(16, 8, 5),    # (B,8,26,26)
        *_up(8, 4, 5),     # (B,4,30,30)
        nn.ConvTranspose2d(4, 1, 3),  # (B,1,32,32)
        nn.Tanh(),
    )
    return Generator(net, (1, 6, 6))


def seed_discriminator(*, spectral_norm: bool = False) -> Discriminator:
    """LeNet-5 as the tutorial had it, ending in a logit (the Sigmoid lives in the loss)."""
    sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
    norm = (lambda c: nn.Identity()) if spectral_norm else nn.BatchNorm2d
    net = nn.Sequential(
        sn(nn.Conv2d(1, 6, 5)), norm(6), nn.LeakyReLU(0.2, True),  # (B,6,28,28)
        nn.MaxPool2d(2),                                            # (B,6,14,14)
        sn(nn.Conv2d(6, 16, 5)), norm(16), nn.LeakyReLU(0.2, True),  # (B,16,10,10)
        nn.MaxPool2d(2),                                            # (B,16,5,5)
        nn.Flatten(),                                               # (B,400)
        sn(nn.Linear(400, 120)), nn.LeakyReLU(0.2, True),           # (B,120)
        sn(nn.Linear(120, 84)), nn.LeakyReLU(0.2, True),            # (B,84)
        sn(nn.Linear(84, 1)),                                       # (B,1) logit
    )
    return Discriminator(net)


def dcgan_generator(*, nz: int = 100, ngf: int = 64) -> Generator:
    """DCGAN (Radford et al. 2015) sized for 32x32, as in pytorch/examples."""
    net = nn.Sequential(
        *_up(nz, ngf * 4, 4, 1, 0),        # (B,256,4,4)
        *_up(ngf * 4, ngf * 2, 4, 2, 1),   # (B,128,8,8)
        *_up(ngf * 2, ngf, 4, 2, 1),       # (B,64,16,16)
        nn.ConvTranspose2d(ngf, 1, 4, 2, 1, bias=False),  # (B,1,32,32)
        nn.Tanh(),
    )
    return Generator(net, (nz, 1, 1))


def dcgan_discriminator(*, ndf: int = 64, spectral_norm: bool = False) -> Discriminator:
    sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
    norm = (lambda c: nn.Identity()) if spectral_norm else nn.BatchNorm2d
    net = nn.Sequential(
        sn(nn.Conv2d(1, ndf, 4, 2, 1, bias=False)), nn.LeakyReLU(0.2, True),                  # (B,64,16,16)
        sn(nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False)), norm(ndf * 2), nn.LeakyReLU(0.2, True),  # (B,128,8,8)
        sn(nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False)), norm(ndf * 4), nn.LeakyReLU(0.2, True),  # (B,256,4,4)
        sn(nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False)),                                        # (B,1,1,1)
    )
    return Discriminator(net)


@dataclass(frozen=True)
class Arch:
    generator: Callable[[], Generator]
    discriminator: Callable[..., Discriminator]
    description: str


ARCHS: dict[str, Arch] = {
    "seed": Arch(seed_generator, seed_discriminator,
                 "tutorial generator: stride-1 5x5 transposed convs from (1,6,6) noise; LeNet-5 discriminator"),
    "dcgan": Arch(dcgan_generator, dcgan_discriminator,
                  "DCGAN for 32x32: strided transposed convs from (100,1,1) noise; strided-conv discriminator"),
}


def weights_init(module: nn.Module) -> None:
    """DCGAN initialisation: N(0, 0.02) convs, N(1, 0.02) BatchNorm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and hasattr(module, "weight"):
        w = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        nn.init.normal_(w, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build(arch: str, *, spectral_norm: bool = False) -> tuple[Generator, Discriminator]:
    """A freshly initialised (G, D) pair for `arch`; draws from torch's global RNG."""
    spec = ARCHS[arch]
    g, d = spec.generator(), spec.discriminator(spectral_norm=spectral_norm)
    g.apply(weights_init)
    d.apply(weights_init)
    return g, d


def build_generator(arch: str) -> Generator:
    return ARCHS[arch].generator()


def ema_copy(g: Generator) -> Generator:
    ema = copy.deepcopy(g).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: Generator, g: Generator, decay: float) -> None:
    """Parameters move towards G by (1 - decay); buffers (BatchNorm statistics) are copied."""
    for pe, pg in zip(ema.parameters(), g.parameters()):
        pe.lerp_(pg, 1.0 - decay)
    for be, bg in zip(ema.buffers(), g.buffers()):
        be.copy_(bg)


def _taps(n_in: int, n_out: int, k: int, stride: int, pad: int, *, transposed: bool) -> int:
    """(input position, kernel tap) pairs along one axis that join a real input value to an output."""
    if transposed:  # input i, tap t -> output i * stride - pad + t
        return sum(0 <= i * stride - pad + t < n_out for i in range(n_in) for t in range(k))
    return sum(0 <= o * stride - pad + t < n_in for o in range(n_out) for t in range(k))


def flops_per_image(g: Generator) -> dict[str, float]:
    """Multiply-adds x2 of every (transposed) convolution for one image. Useful: the products of a real
    input value and a weight that land in the output (a strided transposed conv's padding crops some:
    the dcgan's 28.9 MFLOP against 34.9 for every tap). Padded: what a transposed conv costs run as a
    conv over its zero-padded (and, when strided, zero-interleaved) input."""
    useful = padded = 0.0
    hooks = []

    def count(m: nn.Module, inp, out):
        nonlocal useful, padded
        cin, h_in, w_in = inp[0].shape[1:]
        cout, h_out, w_out = out.shape[1:]
        kh, kw = m.kernel_size
        transposed = isinstance(m, nn.ConvTranspose2d)
        taps = [_taps(n_in, n_out, k, s, p, transposed=transposed) for n_in, n_out, k, s, p in
                zip((h_in, w_in), (h_out, w_out), (kh, kw), m.stride, m.padding)]
        useful += 2 * cin * cout // m.groups * taps[0] * taps[1]
        padded += 2 * cin * cout // m.groups * kh * kw * h_out * w_out

    for m in g.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(m.register_forward_hook(count))
    with torch.no_grad():
        g.eval()(torch.zeros(1, *g.latent_shape))
    for h in hooks:
        h.remove()
    return {"useful": useful, "padded": padded}
