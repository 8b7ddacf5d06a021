"""Generate a synthetic cohort: ``manifest.csv`` + ``ct/*.nii.gz`` (+ ``labelmap/*.nii.gz``) + ``cohort.json``.

Deterministic: the same :class:`CohortSpec` gives a byte-identical manifest and identical voxel arrays, whatever
the number of workers, because every patient draws from streams keyed by ``(seed, index)`` and rows are written in
index order. A folder is complete only once ``cohort.json`` exists (written last, atomically); an interrupted run
leaves a ``.generating.json`` marker and can be rerun with the same arguments to finish it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from xcardia import __version__
from xcardia.atomic import write_atomic, write_text_atomic
from xcardia.errors import XcardiaError
from xcardia.cohort.physiology import sample_patient
from xcardia.cohort.render import RenderSpec, render_ct
from xcardia.data.manifest import COMPLETE_MARKER, PARTIAL_MARKER, manifest_file
from xcardia.schema import COLUMNS, GT_COLUMNS, SPLITS

GENERATOR_VERSION = "2.0"


class CohortError(XcardiaError):
    """A problem with a cohort folder or generation request, with what to do about it."""


@dataclass(frozen=True)
class CohortSpec:
    """Everything that determines a synthetic cohort.

    Attributes:
        n_patients: number of patients.
        seed: cohort seed; ``(seed, index)`` determines each patient.
        render: image geometry (shape, spacing, field of view).
        split_fractions: fractions of (pretrain, train, val, test), assigned at patient level.
        write_labelmap: also write the structure label maps.
    """

    n_patients: int
    seed: int = 0
    render: RenderSpec = field(default_factory=RenderSpec)
    split_fractions: tuple[float, float, float, float] = (0.5, 0.2, 0.1, 0.2)
    write_labelmap: bool = True

    def __post_init__(self):
        if not isinstance(self.n_patients, int) or self.n_patients < 1:
            raise CohortError(f"n_patients must be a positive integer, got {self.n_patients!r}")
        if len(self.split_fractions) != 4 or any(f < 0 for f in self.split_fractions):
            raise CohortError(f"split_fractions needs four non-negative numbers (pretrain, train, val, test), "
                              f"got {self.split_fractions!r}")
        if not math.isclose(sum(self.split_fractions), 1.0, abs_tol=1e-6):
            raise CohortError(f"split_fractions must sum to 1, got {self.split_fractions!r} (sum {sum(self.split_fractions)})")

    def to_json(self) -> dict:
        d = asdict(self)
        d["render"]["shape"] = list(self.render.shape)
        d["split_fractions"] = list(self.split_fractions)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CohortSpec":
        render = RenderSpec(shape=tuple(d["render"]["shape"]), spacing_mm=float(d["render"]["spacing_mm"]),
                            field_of_view=d["render"]["field_of_view"])
        return cls(n_patients=int(d["n_patients"]), seed=int(d["seed"]), render=render,
                   split_fractions=tuple(float(f) for f in d["split_fractions"]), write_labelmap=bool(d["write_labelmap"]))


def assign_splits(n_patients: int, seed: int, fractions: tuple[float, ...]) -> list[str]:
    """Patient-level split of ``n_patients`` by a seeded permutation, with exact counts per split."""
    counts = [int(math.floor(f * n_patients)) for f in fractions]
    for i in np.argsort([-(f * n_patients - c) for f, c in zip(fractions, counts)], kind="stable"):
        if sum(counts) == n_patients:
            break
        counts[i] += 1
    order = np.random.default_rng([seed, 7_777]).permutation(n_patients)
    splits = [""] * n_patients
    start = 0
    for name, count in zip(SPLITS, counts):
        for idx in order[start : start + count]:
            splits[int(idx)] = name
        start += count
    return splits


def manifest_columns(write_labelmap: bool) -> list[str]:
    real_only = ("heart_mask_path", "npy_spacing_mm")  # columns for real cohorts; a synthetic one has no use for them
    cols = [c.name for c in COLUMNS if (c.name != "labelmap_path" or write_labelmap) and c.name not in real_only]
    return cols + [c.name for c in GT_COLUMNS]


def _format(value) -> str:
    """Manifest cell text: empty for missing, shortest round-trip repr for floats (deterministic)."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if float(value).is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(float(value))
    return str(value)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI atomically (temporary name, then rename) with RAS affine, mm units and both qform/sform."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    write_atomic(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")


def _generate_one(args) -> dict:
    """Worker: physiology + rendering + NIfTI writing for one patient; returns its manifest row."""
    spec_json, index, out_dir = args
    spec = CohortSpec.from_json(spec_json)
    patient = sample_patient(spec.seed, index)
    ct = render_ct(patient.anatomy, spec.render, np.random.default_rng([spec.seed, index, 1]))
    out = Path(out_dir)
    row = {"patient_id": patient.patient_id, "ct_path": f"ct/{patient.patient_id}.nii.gz"}
    save_nifti(out / row["ct_path"], ct.hu, ct.affine)
    if spec.write_labelmap:
        row["labelmap_path"] = f"labelmap/{patient.patient_id}.nii.gz"
        save_nifti(out / row["labelmap_path"], ct.labelmap, ct.affine)
    row.update(patient.table)
    row.update(patient.gt)
    return row


def _check_folder(out: Path, spec: CohortSpec) -> bool:
    """True if ``out`` already holds this exact cohort; raises if it holds something else."""
    complete = out / COMPLETE_MARKER
    if complete.exists():
        existing = json.loads(complete.read_text())
        if existing.get("spec") == spec.to_json() and existing.get("generator_version") == GENERATOR_VERSION:
            return True
        raise CohortError(f"{out} already holds a different cohort ({complete} has spec {existing.get('spec')}); "
                          f"choose another --out or delete that folder")
    partial = out / PARTIAL_MARKER
    if partial.exists():
        existing = json.loads(partial.read_text())
        if existing.get("spec") != spec.to_json():
            raise CohortError(f"{out} holds an unfinished generation of a different cohort ({partial}); "
                              f"rerun with its original arguments to finish it, or delete the folder")
    elif out.exists() and any(out.iterdir()):
        raise CohortError(f"{out} is not empty and is not an xcardia cohort; choose an empty or new --out folder")
    return False


def generate_cohort(out_dir: str | os.PathLike, spec: CohortSpec, workers: int = 1, progress: bool = True) -> Path:
    """Generate the cohort described by ``spec`` into ``out_dir`` and return the manifest path.

    Args:
        out_dir: output folder; created if needed. If it already holds this exact cohort, nothing is redone.
        spec: the cohort specification.
        workers: number of processes (the result does not depend on it).
        progress: show a tqdm progress bar.

    Raises:
        CohortError: ``out_dir`` holds a different cohort or unrelated files, or the request is invalid.
    """
    if workers < 1:
        raise CohortError(f"workers must be at least 1, got {workers}")
    out = Path(out_dir)
    if _check_folder(out, spec):
        return out / "manifest.csv"
    (out / "ct").mkdir(parents=True, exist_ok=True)
    if spec.write_labelmap:
        (out / "labelmap").mkdir(exist_ok=True)
    (out / PARTIAL_MARKER).write_text(json.dumps({"spec": spec.to_json()}, indent=2))

    from xcardia.progress import bar as tqdm

    jobs = [(spec.to_json(), i, str(out)) for i in range(spec.n_patients)]
    bar = tqdm(total=spec.n_patients, desc="generating cohort", unit="patient", disable=not progress)
    rows: list[dict] = []
    if workers == 1:
        for job in jobs:
            rows.append(_generate_one(job))
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for row in pool.imap(_generate_one, jobs, chunksize=max(1, min(32, spec.n_patients // (8 * workers)))):
                rows.append(row)
                bar.update()
    bar.close()

    splits = assign_splits(spec.n_patients, spec.seed, spec.split_fractions)
    for row, split in zip(rows, splits):
        row["split"] = split
    columns = manifest_columns(spec.write_labelmap)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row.get(c)) for c in columns])
    write_text_atomic(out / "manifest.csv", buf.getvalue())
    meta = {
        "generator": "xcardia.cohort",
        "generator_version": GENERATOR_VERSION,
        "xcardia_version": __version__,
        "spec": spec.to_json(),
        "split_counts": {s: splits.count(s) for s in SPLITS},
        "regenerate": regenerate_command(spec, out),
    }
    write_text_atomic(out / COMPLETE_MARKER, json.dumps(meta, indent=2))
    (out / PARTIAL_MARKER).unlink(missing_ok=True)
    return out / "manifest.csv"


def regenerate_command(spec: CohortSpec, out: Path) -> str:
    shape = spec.render.shape
    shape_arg = str(shape[0]) if len(set(shape)) == 1 else ",".join(map(str, shape))
    cmd = (f"python -m xcardia generate --n-patients {spec.n_patients} --shape {shape_arg} "
           f"--spacing {spec.render.spacing_mm:g} --field-of-view {spec.render.field_of_view} --seed {spec.seed} "
           f"--splits {','.join(f'{f:g}' for f in spec.split_fractions)} --out {out}")
    if not spec.write_labelmap:
        cmd += " --no-labelmap"
    return cmd


def prepare_cohort(profile, data: str | os.PathLike | None, output_dir: str | os.PathLike, progress: bool = True) -> Path:
    """The manifest a notebook or command should use.

    Args:
        profile: a :class:`xcardia.config.Profile`.
        data: a real (or previously generated) manifest or cohort folder; None generates the profile's synthetic
            cohort under ``output_dir/cohort`` (or reuses it when it is already there and complete).
        output_dir: the reproduction's output folder.
        progress: show generation progress.
    """
    if data is not None:
        return manifest_file(data)
    return generate_cohort(Path(output_dir) / "cohort", profile.cohort, workers=profile.generate_workers, progress=progress)
