"""Registry of dual encoders.

``create_encoder(name)`` accepts a registered name (``xmr-lite2-open``, the
default, ``xmr-lite2`` and its variants), a Hugging Face hub name or a local folder of a CLIP-family model
(``openai/clip-vit-base-patch32``, ``hf:google/siglip-base-patch16-224``),
or a folder holding an xmr checkpoint (``config.json`` with format
``xmr-checkpoint``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UnknownModel
from .base import DualEncoder, l2_normalize

DEFAULT_MODEL = "xmr-lite2-open"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def builtin_models() -> dict[str, Path]:
    """Name -> checkpoint folder of every model shipped in the package."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(WEIGHTS_DIR.iterdir()) if (p / "config.json").is_file()}


def builtin_variants() -> dict[str, tuple[Path, dict]]:
    """Name -> (checkpoint folder, settings) of the shipped variants: the same
    weights run with other settings (test-time views, fusion weight), listed
    under ``variants`` in a checkpoint's config.json."""
    out = {}
    for path in builtin_models().values():
        meta = json.loads((path / "config.json").read_text())
        for variant, settings in meta.get("variants", {}).items():
            out[variant] = (path, settings)
    return out


def resolve_model(name: str) -> tuple[str, str]:
    """``(kind, location)`` with kind ``xmr``, ``xmr-variant`` or ``hf``."""
    builtins = builtin_models()
    if name in builtins:
        return "xmr", str(builtins[name])
    if name in builtin_variants():
        return "xmr-variant", name
    if name.startswith("hf:"):
        return "hf", name[3:]
    path = Path(name).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                if json.loads(cfg.read_text()).get("format") == "xmr-checkpoint":
                    return "xmr", str(path.resolve())
            except ValueError:
                pass
        return "hf", str(path.resolve())
    if "/" in name:
        return "hf", name
    raise UnknownModel(
        f"unknown model {name!r}; use one of: {', '.join([*builtins, *builtin_variants()]) or '(none shipped)'}, "
        "a Hugging Face CLIP/SigLIP name such as openai/clip-vit-base-patch32, or a local model folder"
    )


def create_encoder(name: str = DEFAULT_MODEL, device: str | None = None, backend: str | None = None) -> DualEncoder:
    """The encoder ``name`` names; ``backend`` picks an xmr model's CPU image
    path (default: XMR_BACKEND, else auto)."""
    kind, location = resolve_model(name)
    if kind in ("xmr", "xmr-variant"):
        from .xmr import XmrEncoder

        if kind == "xmr-variant":
            path, settings = builtin_variants()[name]
            return XmrEncoder.from_checkpoint(str(path), name=name, device=device, overrides=settings,
                                              backend=backend)
        return XmrEncoder.from_checkpoint(location, name=name, device=device, backend=backend)
    from .hf_clip import HFClipEncoder

    return HFClipEncoder(location, device=device)


__all__ = ["DualEncoder", "l2_normalize", "create_encoder", "resolve_model", "builtin_models", "DEFAULT_MODEL"]
