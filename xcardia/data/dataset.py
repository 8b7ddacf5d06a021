"""A MONAI dataset over a manifest: preprocessed CT, tabular inputs, NW concept targets and task labels.

Images come through :class:`~xcardia.data.imaging.PreprocessCache` (so after the first pass no NIfTI or DICOM is
read again) and, with ``in_memory``, stay in RAM for CPU-sized profiles. Augmentation (small affine, intensity
noise; MONAI transforms) is seeded per ``(seed, epoch, patient)``: the same sample gets the same augmentation
whatever the number of loader workers, and a resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from monai.data import Dataset

from xcardia.schema import CONCEPT_NAMES, LABELS
from xcardia.data.imaging import PreprocessCache
from xcardia.data.manifest import resolve_ct_path


@dataclass(frozen=True)
class AugmentSpec:
    """Light augmentation: rotation (radians) and translation (voxels) ranges, Gaussian noise SD (scaled units)."""

    rotate: float = 0.09
    translate: float = 2.0
    noise_sd: float = 0.02


def table_array(manifest: pd.DataFrame, columns) -> np.ndarray:
    """(N, len(columns)) float array of the given columns (absent columns are all NaN)."""
    out = np.full((len(manifest), len(columns)), np.nan, dtype=np.float32)
    for j, col in enumerate(columns):
        if col in manifest:
            out[:, j] = pd.to_numeric(manifest[col], errors="coerce").to_numpy(dtype=np.float32)
    return out


class CohortDataset(Dataset):
    """Patients ``rows`` (positions in ``manifest``) as dictionaries of tensors.

    Args:
        manifest: the cohort manifest.
        rows: positions of the patients in this dataset.
        cache: the preprocessing cache that turns ``ct_path`` into a normalised volume.
        tabular: ``(values, missing)`` arrays for *all* manifest rows (from a fitted TabularPreprocessor), or None.
        augment: augmentation parameters, or None.
        seed: augmentation seed.
        in_memory: keep loaded volumes in RAM.
    """

    def __init__(self, manifest: pd.DataFrame, rows, cache: PreprocessCache, tabular=None,
                 augment: AugmentSpec | None = None, seed: int = 0, in_memory: bool = True):
        self.rows = np.asarray(rows, dtype=np.int64)
        super().__init__(data=[{"row": int(r)} for r in self.rows])
        self.manifest = manifest
        self.paths = [resolve_ct_path(manifest, manifest["ct_path"].iloc[int(r)]) for r in self.rows]
        masks = manifest["heart_mask_path"] if "heart_mask_path" in manifest else None  # e.g. TotalSegmentator's
        self.heart_masks = [None if masks is None or not isinstance(masks.iloc[int(r)], str)
                            else resolve_ct_path(manifest, masks.iloc[int(r)]) for r in self.rows]
        spacing = manifest["npy_spacing_mm"] if "npy_spacing_mm" in manifest else None  # .npy volumes' geometry
        self.npy_spacing = [None if spacing is None or pd.isna(spacing.iloc[int(r)]) else float(spacing.iloc[int(r)])
                            for r in self.rows]
        self.cache = cache
        self.tabular = tabular
        self.concepts = table_array(manifest, CONCEPT_NAMES)
        self.labels = table_array(manifest, LABELS)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.in_memory = in_memory
        self._images: dict[int, np.ndarray] = {}
        self._augmenters = None

    def view(self, augment: AugmentSpec | None = None) -> "CohortDataset":
        """The same patients with other augmentation, sharing this dataset's volumes in RAM (never loaded twice)."""
        other = copy.copy(self)
        other.augment, other._augmenters = augment, None
        return other  # ``_images`` is the same dict object: a volume loaded by either is there for both

    @classmethod
    def from_parts(cls, parts: list["CohortDataset"], rows=None) -> "CohortDataset":
        """The patients of ``parts`` (all of them, or ``rows`` among them) as one dataset reusing their volumes in
        RAM, without augmentation."""
        first = parts[0]
        by_row = {int(r): (part, i) for part in parts for i, r in enumerate(part.rows)}
        rows = np.asarray(list(by_row) if rows is None else rows, dtype=np.int64)
        out = cls(first.manifest, rows, first.cache, first.tabular, None, first.seed, in_memory=True)
        out._images = {k: by_row[int(r)][0].image(by_row[int(r)][1]) for k, r in enumerate(rows)}
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def image(self, i: int) -> np.ndarray:
        """The preprocessed volume of item ``i`` (from RAM, the disk cache, or the original file once)."""
        if i in self._images:
            return self._images[i]
        array = self.cache.load(self.paths[i], self.npy_spacing[i], self.heart_masks[i])
        if self.in_memory:
            self._images[i] = array
        return array

    def warm(self, indices=None, progress: bool = False, desc: str = "preprocessing CTs") -> None:
        """Load every image once, so that errors (naming the file) surface before training and the cache is full."""
        from xcardia.progress import bar as tqdm

        for i in tqdm(range(len(self)) if indices is None else indices, desc=desc, disable=not progress, unit="CT"):
            self.image(int(i))

    def _augment(self, image: np.ndarray, row: int) -> np.ndarray:
        from monai.transforms import RandAffine, RandGaussianNoise

        if self._augmenters is None:
            a = self.augment
            self._augmenters = (
                RandAffine(prob=1.0, rotate_range=(a.rotate,) * 3, translate_range=(a.translate,) * 3,
                           padding_mode="border", mode="bilinear"),
                RandGaussianNoise(prob=1.0, mean=0.0, std=a.noise_sd),
            )
        seed = int(np.random.SeedSequence([self.seed, self.epoch, row]).generate_state(1)[0])
        out = image[None]
        for k, transform in enumerate(self._augmenters):
            transform.set_random_state(seed=(seed + k) % (2**32))
            out = transform(out)
        out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
        return out[0].numpy().astype(np.float32)

    def _transform(self, index: int) -> dict:
        row = int(self.rows[index])
        image = self.image(index)
        if self.augment is not None:
            image = self._augment(image, row)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],
            "concepts": torch.from_numpy(self.concepts[row]),
            "labels": torch.from_numpy(self.labels[row]),
            "index": torch.tensor(row, dtype=torch.long),
        }
        if self.tabular is not None:
            values, missing = self.tabular
            item["tab_values"] = torch.from_numpy(values[row])
            item["tab_missing"] = torch.from_numpy(missing[row])
        return item
