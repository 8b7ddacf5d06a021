"""An init's frozen computations: the encoder built or loaded, its trunk and 128-d features on every evaluated
patient, and the cache that keeps them between notebooks and reruns (keyed by the sha256 of weights and volumes)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xcardia.atomic import write_atomic
from xcardia.data.dataset import CohortDataset
from xcardia.data.imaging import PreprocessSpec
from xcardia.errors import XcardiaError
from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec
from xcardia.models.weights import load_encoder
from xcardia.run_folder import RunFolder


@dataclass
class EncodedInit:
    """An init's frozen computations on the rows of interest: the trunk output (input of the paper's trainable
    part) and the full encoder's 128-d features (input of the linear probe)."""

    name: str
    encoder: ImageEncoder
    rows: np.ndarray
    trunk: torch.Tensor
    features: np.ndarray
    position: dict = field(default_factory=dict)

    def at(self, rows: np.ndarray) -> np.ndarray:
        return np.array([self.position[int(r)] for r in rows], dtype=np.int64)


def refuse_unfinished(source: str, allow_unfinished: bool = False, log=print) -> bool:
    """Whether ``source`` is a pretraining run folder whose ``run.json`` does not say ``complete``; such a run is
    refused in one line unless ``allow_unfinished`` (then said in the log). Returns True for an accepted
    unfinished run."""
    p = Path(str(source))
    if not p.is_dir():
        return False
    info = RunFolder(p).info() or {}
    status = info.get("status", "missing")
    if status == "complete":
        return False
    if not allow_unfinished:
        raise XcardiaError(f"--init {source}: the pretraining run did not finish (run.json status: {status}); "
                           f"finish it with `pretrain --resume --out {source}`, or pass --allow-unfinished to "
                           f"evaluate its latest encoder (the results will say so)")
    log(f"[finetune] warning: {source} did not finish (status {status}); evaluating its latest encoder as asked")
    return True


def build_init(source: str, image_spec: ImageEncoderSpec, preprocess: PreprocessSpec, seed: int) -> ImageEncoder:
    """``scratch`` or ``scratch:K`` (random weights, seeded with ``seed + K``) or a pretrained encoder (run folder,
    encoder file), checked against this preprocessing."""
    if source == "scratch" or source.startswith("scratch:"):
        offset = source.partition(":")[2]
        if offset and not offset.isdigit():
            raise XcardiaError(f"--init {source!r}: write scratch or scratch:K with an integer seed offset K")
        torch.manual_seed(seed + int(offset or 0))
        return ImageEncoder(image_spec)
    encoder, meta = load_encoder(source)
    trained_on = meta.get("preprocess")
    if trained_on and (tuple(trained_on["shape"]) != tuple(preprocess.shape)
                       or float(trained_on["spacing_mm"]) != float(preprocess.spacing_mm)):
        raise XcardiaError(f"{source}: the encoder was pretrained on {tuple(trained_on['shape'])} voxels at "
                           f"{trained_on['spacing_mm']} mm, this evaluation prepares {tuple(preprocess.shape)} at "
                           f"{preprocess.spacing_mm} mm; use the profile it was trained with")
    return encoder


@torch.no_grad()
def encode(name: str, encoder: ImageEncoder, dataset: CohortDataset, batch_size: int = 64) -> EncodedInit:
    encoder.eval()
    trunks, features = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        t = encoder.trunk(batch["image"])
        trunks.append(t)
        features.append(encoder.top(t))
    rows = dataset.rows
    return EncodedInit(name, encoder, rows, torch.cat(trunks), torch.cat(features).numpy(),
                       {int(r): i for i, r in enumerate(rows)})


def _weights_digest(encoder: ImageEncoder) -> str:
    """sha256 of an encoder's architecture and every tensor of its state (names, dtypes, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256(json.dumps(encoder.spec.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _volumes_digest(dataset: CohortDataset) -> str:
    """sha256 of the preprocessed volumes of ``dataset``, in its order (what :func:`encode` reads)."""
    import hashlib

    h = hashlib.sha256(np.asarray(dataset.rows, dtype=np.int64).tobytes())
    for i in range(len(dataset)):
        h.update(np.ascontiguousarray(dataset.image(i), dtype=np.float32).tobytes())
    return h.hexdigest()


def encode_cached(name: str, encoder: ImageEncoder, dataset: CohortDataset, cache_root: str | os.PathLike | None,
                  volumes_digest: str | None = None, log=print) -> EncodedInit:
    """:func:`encode`, stored under ``cache_root/encoded/`` and reused by any later evaluation (notebook 05 after
    04, a rerun) that feeds the same weights the same volumes: the key is the sha256 of the encoder's tensors and of
    the volumes, so a reused entry holds exactly what encoding would recompute on this machine. An unreadable or
    mismatching entry is recomputed, with a log line."""
    if cache_root is None:
        return encode(name, encoder, dataset)
    import hashlib

    volumes_digest = volumes_digest or _volumes_digest(dataset)
    key = hashlib.sha256(f"encode-v1|{torch.__version__}|{_weights_digest(encoder)}|{volumes_digest}".encode()).hexdigest()[:40]
    path = Path(cache_root) / "encoded" / key[:2] / f"{key}.pt"
    rows = np.asarray(dataset.rows, dtype=np.int64)
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if np.array_equal(saved["rows"].numpy(), rows) and len(saved["trunk"]) == len(rows) == len(saved["features"]):
                encoder.eval()
                return EncodedInit(name, encoder, dataset.rows, saved["trunk"], saved["features"].numpy(),
                                   {int(r): i for i, r in enumerate(dataset.rows)})
            log(f"[finetune] {path}: does not match {name}'s rows; encoding again")
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is recomputed, never trusted
            log(f"[finetune] {path}: unreadable ({type(exc).__name__}); encoding {name} again")
    encoded = encode(name, encoder, dataset)
    try:
        write_atomic(path, lambda tmp: torch.save({"rows": torch.as_tensor(rows), "trunk": encoded.trunk,
                                                   "features": torch.as_tensor(encoded.features)}, tmp), suffix=".pt")
    except OSError as exc:  # a full disk or a read-only cache costs the reuse, never the evaluation
        log(f"[finetune] could not keep {name}'s encoding in {path.parent} ({exc.strerror or exc}); continuing without")
    return encoded
