"""An init's frozen computations: the encoder built or loaded, its trunk and 128-d features on every evaluated
patient, and the cache that keeps them between notebooks and reruns (keyed by the sha256 of weights and volumes)."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

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


def refuse_unfinished(source: str, allow_unfinished: bool = False, log=print,
                      flag: str | None = "--allow-unfinished") -> bool:
    """Whether ``source`` is a pretraining run folder whose ``run.json`` does not say ``complete``; such a run is
    refused in one line unless ``allow_unfinished`` (then said in the log). ``flag``: the option of the calling
    command that accepts an unfinished run, named in the refusal (None: the command has none). Returns True for an
    accepted unfinished run."""
    p = Path(str(source))
    if not p.is_dir():
        return False
    info = RunFolder(p).info() or {}
    status = info.get("status", "missing")
    if status == "complete":
        return False
    if not allow_unfinished:
        raise XcardiaError(f"--init {source}: the pretraining run did not finish (run.json status: {status}); "
                           f"finish it with `pretrain --resume --out {source}`"
                           + (f", or pass {flag} to evaluate its latest encoder (the results will say so)" if flag
                              else " first"))
    log(f"[finetune] warning: {source} did not finish (status {status}); evaluating its latest encoder as asked")
    return True


def build_init(source: str, image_spec: ImageEncoderSpec, preprocess: PreprocessSpec, seed: int,
               log=None) -> ImageEncoder:
    """``scratch`` or ``scratch:K`` (random weights, seeded with ``seed + K``) or a pretrained encoder (run folder,
    encoder file, a public checkpoint), checked against this preprocessing. A file from the public code gets its
    one-line load report (what was mapped, ignored, missing) in ``log``."""
    if source == "scratch" or source.startswith("scratch:"):
        offset = source.partition(":")[2]
        if offset and not offset.isdigit():
            raise XcardiaError(f"--init {source!r}: write scratch or scratch:K with an integer seed offset K")
        torch.manual_seed(seed + int(offset or 0))
        return ImageEncoder(image_spec)
    encoder, meta = load_encoder(source)
    if log is not None and str(meta.get("source", "")).startswith("public"):
        log(f"[finetune] {source} ({meta['source']}): {meta['load_report']}")
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


class _TrunkStages(nn.Module):
    """The stages :meth:`ImageEncoder.trunk` runs (stem, layer1–3) as one module, so that a BatchNorm update
    touches only them — never the trained stage's statistics, which the fine-tuning loop itself moves."""

    def __init__(self, encoder: ImageEncoder):
        super().__init__()
        b = encoder.backbone
        self.stages = nn.ModuleList([b.conv1, b.bn1, b.layer1, b.layer2, b.layer3])
        self._forward = encoder.trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


def trunk_batchnorm_state(encoder: ImageEncoder) -> dict[str, torch.Tensor]:
    """The running statistics of the frozen trunk's BatchNorm layers (names as in ``_TrunkStages``)."""
    return {k: v.clone() for k, v in _TrunkStages(encoder).state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@torch.no_grad()
def reestimate_trunk_batchnorm(encoder: ImageEncoder, dataset: CohortDataset, batch_size: int) -> ImageEncoder:
    """A copy of ``encoder`` whose frozen-trunk BatchNorm statistics are re-estimated on ``dataset``'s volumes.

    The public fine-tuning loop runs the whole network in training mode (``Finetuning.py:556``), so its frozen
    stages normalise with the fine-tuning data's statistics and re-estimate their running statistics on it; a
    cached trunk computed with the init's own statistics does neither (for a scratch init: mean 0 / variance 1,
    no normalisation at all). Here the statistics are the cumulative average over micro-batches of ``batch_size``
    in the dataset's order (``torch.optim.swa_utils.update_bn``; the public micro-batch is 12), weights untouched.
    The trained stage (layer4) keeps the init's statistics: the loop moves them itself. Register D3."""
    from torch.optim.swa_utils import update_bn

    encoder = copy.deepcopy(encoder)
    stages = _TrunkStages(encoder)
    loader = (batch["image"] for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False))
    update_bn(loader, stages)
    return encoder.eval()


def encode_cached(name: str, encoder: ImageEncoder, dataset: CohortDataset, cache_root: str | os.PathLike | None,
                  volumes_digest: str | None = None, log=print, batchnorm_data: CohortDataset | None = None,
                  batchnorm_batch: int = 12) -> EncodedInit:
    """:func:`encode`, stored under ``cache_root/encoded/`` and reused by any later evaluation (notebook 05 after
    04, a rerun) that feeds the same weights the same volumes: the key is the sha256 of the encoder's tensors and of
    the volumes, so a reused entry holds exactly what encoding would recompute on this machine. An unreadable or
    mismatching entry is recomputed, with a log line.

    With ``batchnorm_data`` the frozen trunk's BatchNorm statistics are first re-estimated on those volumes
    (:func:`reestimate_trunk_batchnorm`); the key then also holds those rows and the micro-batch size, the entry
    keeps the re-estimated statistics, and the returned init's encoder carries them (so a bundle exported from it
    screens new CTs exactly as the evaluation scored the test split)."""
    import hashlib

    if batchnorm_data is not None:
        bn_rows = np.asarray(batchnorm_data.rows, dtype=np.int64)
        treatment = f"|bn-reestimated|{hashlib.sha256(bn_rows.tobytes()).hexdigest()}|{int(batchnorm_batch)}"
    else:
        treatment = ""
    if cache_root is None:
        if batchnorm_data is not None:
            encoder = reestimate_trunk_batchnorm(encoder, batchnorm_data, batchnorm_batch)
        return encode(name, encoder, dataset)

    volumes_digest = volumes_digest or _volumes_digest(dataset)
    key = hashlib.sha256(f"encode-v1|{torch.__version__}|{_weights_digest(encoder)}|{volumes_digest}{treatment}"
                         .encode()).hexdigest()[:40]
    path = Path(cache_root) / "encoded" / key[:2] / f"{key}.pt"
    rows = np.asarray(dataset.rows, dtype=np.int64)
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if np.array_equal(saved["rows"].numpy(), rows) and len(saved["trunk"]) == len(rows) == len(saved["features"]):
                if batchnorm_data is not None:
                    encoder = copy.deepcopy(encoder)
                    _TrunkStages(encoder).load_state_dict(saved["batchnorm"], strict=False)
                encoder.eval()
                return EncodedInit(name, encoder, dataset.rows, saved["trunk"], saved["features"].numpy(),
                                   {int(r): i for i, r in enumerate(dataset.rows)})
            log(f"[finetune] {path}: does not match {name}'s rows; encoding again")
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is recomputed, never trusted
            log(f"[finetune] {path}: unreadable ({type(exc).__name__}); encoding {name} again")
    if batchnorm_data is not None:
        encoder = reestimate_trunk_batchnorm(encoder, batchnorm_data, batchnorm_batch)
    encoded = encode(name, encoder, dataset)
    entry = {"rows": torch.as_tensor(rows), "trunk": encoded.trunk, "features": torch.as_tensor(encoded.features)}
    if batchnorm_data is not None:
        entry["batchnorm"] = trunk_batchnorm_state(encoder)
    try:
        write_atomic(path, lambda tmp: torch.save(entry, tmp), suffix=".pt")
    except OSError as exc:  # a full disk or a read-only cache costs the reuse, never the evaluation
        log(f"[finetune] could not keep {name}'s encoding in {path.parent} ({exc.strerror or exc}); continuing without")
    return encoded
