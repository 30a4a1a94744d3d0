"""`gantk doctor`: what is installed and what the accelerators look like to torch and onnxruntime."""
from __future__ import annotations

from importlib import metadata
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def report() -> dict[str, Any]:
    import torch

    from . import __version__

    warnings: list[str] = []
    r: dict[str, Any] = {"gantk": __version__, "torch": str(torch.__version__)}
    for dist in ("torchvision", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
        r[dist] = _version(dist) or "not installed"
    r["cuda (torch)"] = torch.version.cuda or "none (CPU build)"
    r["cuda available"] = torch.cuda.is_available()
    r["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
    r["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import onnxruntime as ort

        r["onnxruntime providers"] = ort.get_available_providers()
        r["onnxruntime device"] = ort.get_device()
    except ImportError as e:
        r["onnxruntime providers"] = f"cannot import onnxruntime: {e}"
        warnings.append("onnxruntime does not import; install onnxruntime-gpu (Linux x86-64) or onnxruntime")
    if _version("onnxruntime") and _version("onnxruntime-gpu"):
        warnings.append("both onnxruntime and onnxruntime-gpu are installed and shadow each other; "
                        "pip uninstall -y onnxruntime onnxruntime-gpu, then install only one")
    if r["onnxruntime-gpu"] != "not installed" and torch.cuda.is_available() and \
            "CUDAExecutionProvider" not in r.get("onnxruntime providers", []):
        warnings.append("CUDA works in torch but onnxruntime has no CUDA provider")
    r["gantk runs on"] = "cuda" if torch.cuda.is_available() else \
        "cpu (no usable CUDA device; GPU providers listed above are built in, not usable here)"
    r["warnings"] = warnings
    return r
