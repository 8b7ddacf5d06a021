"""Encoder weight files for downstream use, loaded with an explicit key mapping.

Defect 4 of the public code: fine-tuning loaded pretrained weights with ``strict=False`` under a key prefix that
did not match, so the pretrained weights most likely never loaded and nobody was told. Here loading maps keys
explicitly (from an encoder file, a pretraining checkpoint, or a state dict in the paper's naming) and refuses —
listing the keys — unless every tensor of the encoder is loaded with the right shape. Files are read with
``torch.load(..., weights_only=True)``.

The public code's files load too, into :data:`PUBLIC_ARCHITECTURE` (its Hara ResNet-50):

- ``Pretraining.py``'s ``best.pth`` / ``latest.pth`` (a bare ``MultiModalNW`` state dict, :588-591): ``res3d.*`` is
  the backbone and ``fc_img.*`` the 2048 → 128 feature layer; ``res3d.fc.*`` exists in that file but the model's
  forward never uses it (:240-254), so it is dropped;
- ``Finetuning.py``'s ``best_model.pt`` (``{"model": MultiTaskModel state dict, "epoch", "macro_val_auc"}``,
  :599): ``backbone.*`` is the backbone and ``backbone.fc.*`` the feature layer (:336-338); the heads are dropped;
- the released checkpoint as the public README loads it (``checkpoint["state_dict"]``, README "Loading Pretrained
  Weights"), and any of these saved from a DDP/DeepSpeed wrapper (every key prefixed ``module.``).

Loading is strict: every encoder tensor must come from the file. What was mapped, what was ignored (the unused
classifier, the tabular side, projections, heads) and what is missing is said in one line
(``metadata["load_report"]``), so a user sees what a file contributed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from xcardia.atomic import write_atomic
from xcardia.errors import XcardiaError
from xcardia.models.image_encoder import PUBLIC_ARCHITECTURE, ImageEncoder, ImageEncoderSpec

ENCODER_FORMAT = "xcardia-image-encoder"
#: Key prefixes of known sources → the encoder's own names.
KEY_PREFIXES: dict[str, str | None] = {
    "image_encoder.": "",        # an xcardia pretraining checkpoint's full model
    "module.image_encoder.": "",  # the same saved from a DDP wrapper
    "res3d.fc.": None,           # the public MultiModalNW's unused classifier (Pretraining.py:240-254): dropped
    "res3d.": "backbone.",       # the paper's MultiModalNW: its 3D ResNet ...
    "fc_img.": "feature.",       # ... and its 2048 → 128 image feature layer
    "backbone.fc.": "feature.",  # Finetuning.py's MultiTaskModel: the backbone's fc is the 128-d feature layer
}


def save_encoder(path: str | os.PathLike, encoder: ImageEncoder, metadata: dict) -> Path:
    """Write an encoder-only weights file (atomically) with its architecture and provenance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": ENCODER_FORMAT, "version": 1, "spec": encoder.spec.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}, "metadata": metadata}
    write_atomic(path, lambda tmp: torch.save(payload, tmp))
    return path


def _unwrapped(key: str) -> str:
    """``key`` without the ``module.`` prefix a DDP/DeepSpeed wrapper adds (``module.image_encoder.`` is a known
    prefix of its own)."""
    return key[len("module."):] if key.startswith("module.") and not key.startswith("module.image_encoder.") else key


def map_encoder_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder tensors of ``state_dict`` under the encoder's own key names (other tensors are dropped)."""
    mapped = {}
    for key, value in state_dict.items():
        key = _unwrapped(key)
        for prefix, replacement in KEY_PREFIXES.items():
            if key.startswith(prefix):
                if replacement is not None:
                    mapped[replacement + key[len(prefix):]] = value
                break
        else:
            if key.startswith(("backbone.", "feature.")):
                mapped[key] = value
    return mapped


def load_report(state_dict: dict[str, torch.Tensor], mapped: dict[str, torch.Tensor]) -> str:
    """One line: how many encoder tensors were loaded and from which prefixes, and which of the file's other tensors
    were ignored (grouped by their first name component)."""
    used, ignored = {}, {}
    for key in state_dict:
        bare = _unwrapped(key)
        target = next((p for p in KEY_PREFIXES if bare.startswith(p)), None)
        if target is not None and KEY_PREFIXES[target] is not None:
            used[target + "*"] = used.get(target + "*", 0) + 1
        elif target is None and bare.startswith(("backbone.", "feature.")):
            group = bare.split(".")[0] + ".*"
            used[group] = used.get(group, 0) + 1
        else:
            group = (target + "*") if target else bare.split(".")[0] + ".*"
            ignored[group] = ignored.get(group, 0) + 1
    line = f"loaded {len(mapped)} encoder tensors ({', '.join(f'{k} {v}' for k, v in used.items())})"
    line += (f"; ignored {sum(ignored.values())} ({', '.join(f'{k} {v}' for k, v in sorted(ignored.items()))})"
             if ignored else "; nothing ignored")
    return line + "; none missing"


def load_encoder_state(encoder: ImageEncoder, state_dict: dict[str, torch.Tensor], source: str = "weights") -> str:
    """Load ``state_dict`` into ``encoder`` strictly, after mapping keys; refuse with the offending keys listed.
    Returns the one-line :func:`load_report`."""
    mapped = map_encoder_keys(state_dict)
    expected = encoder.state_dict()
    missing = sorted(k for k in expected if k not in mapped)
    wrong_shape = sorted(k for k in expected if k in mapped and tuple(mapped[k].shape) != tuple(expected[k].shape))
    unexpected = sorted(k for k in mapped if k not in expected)
    if missing or wrong_shape or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} encoder tensor(s) missing (e.g. {', '.join(missing[:4])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with the wrong shape (e.g. {', '.join(wrong_shape[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        raise XcardiaError(f"{source}: cannot load the image encoder: {'; '.join(parts)}. Pretrained weights are "
                           f"never loaded partially; check that the architecture matches the profile")
    encoder.load_state_dict(mapped, strict=True)
    return load_report(state_dict, mapped)


def _is_public_state(payload: dict) -> bool:
    """A state dict written by the public code (``res3d.*``/``fc_img.*`` or ``backbone.*`` + ``heads.*``)."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in payload]
    return bool(keys) and all(isinstance(v, torch.Tensor) for v in payload.values()) and (
        any(k.startswith("res3d.") for k in keys)
        or (any(k.startswith("backbone.") for k in keys) and any(k.startswith("heads.") for k in keys)))


def load_encoder(path: str | os.PathLike) -> tuple[ImageEncoder, dict]:
    """An :class:`ImageEncoder` and its metadata from an encoder file, a pretraining run folder (its
    ``encoder.pt``) or a pretraining checkpoint.

    Raises:
        XcardiaError: the path does not exist, is not an xcardia encoder or checkpoint, or does not load fully.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "encoder.pt"  # a pretraining run folder (RunFolder.ENCODER)
    if not p.exists():
        raise XcardiaError(f"{p} does not exist; pass an encoder file (encoder.pt), a pretraining run folder, "
                           f"or 'scratch'")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise XcardiaError(f"{p}: not a readable weights file ({type(exc).__name__}: {exc}); pass an encoder.pt "
                           f"written by xcardia, a pretraining run folder, or 'scratch'") from None
    if not isinstance(payload, dict):
        raise XcardiaError(f"{p}: not an xcardia encoder or checkpoint")
    wrapper = ""
    if isinstance(payload.get("state_dict"), dict) and payload.get("format") != ENCODER_FORMAT:
        payload, wrapper = payload["state_dict"], "['state_dict'] "  # the released checkpoint (public README)
    if payload.get("format") == ENCODER_FORMAT:
        spec, state, metadata = payload["spec"], payload["state_dict"], payload.get("metadata", {})
    elif "model" in payload and "config" in payload:  # a pretraining checkpoint
        spec = payload["config"]["model"]["image"]
        state, metadata = payload["model"], {"source": "checkpoint", "epoch": payload.get("epoch")}
    elif _is_public_state(payload):  # Pretraining.py's best.pth / latest.pth, or the released checkpoint's state_dict
        spec, state = PUBLIC_ARCHITECTURE.to_dict(), payload
        metadata = {"source": f"public Pretraining.py {wrapper}".rstrip()}
    elif isinstance(payload.get("model"), dict) and _is_public_state(payload["model"]):  # Finetuning.py's best_model.pt
        spec, state = PUBLIC_ARCHITECTURE.to_dict(), payload["model"]
        metadata = {"source": "public Finetuning.py", "epoch": payload.get("epoch")}
    else:
        raise XcardiaError(f"{p}: not an xcardia encoder or checkpoint (no 'format', 'model' or 'state_dict' entry "
                           f"holding a known model's tensors)")
    try:
        encoder = ImageEncoder(ImageEncoderSpec.from_dict(spec))
    except (KeyError, TypeError, ValueError) as exc:
        raise XcardiaError(f"{p}: the encoder file's architecture entry is malformed ({type(exc).__name__}: {exc}); "
                           f"re-export it with xcardia or pass the pretraining run folder") from None
    if not isinstance(state, dict):
        raise XcardiaError(f"{p}: the encoder file holds no state_dict of tensors")
    metadata["load_report"] = load_encoder_state(encoder, state, source=str(p))
    return encoder, metadata
