"""xcardia benchmark suite: ``python -m xcardia bench [--quick] [--json FILE]``.

Every result is a ratio against a baseline measured in the same run on the same machine (absolute times on a
shared machine are noise), printed with the raw medians. Benchmarks never run inside the test suite; the tests only
check that ``bench --scale tiny`` runs.

1. cohort generation per worker at 32³, 64³, 164³, beside one training batch of the smoke encoder;
2. CT preprocessing, cold (NIfTI → MONAI pipeline) against warm (cache hit), and throughput at 164³ / 2 mm;
3. ``clip_loss`` against the textbook single-process implementation, batch 256;
4. a training step with CLIP + NW head against CLIP alone, bank sizes 20 / 4,096 / 65,536, batch 32, D = 256;
5. the engine's training step against a bare forward/backward of the same model on pre-loaded tensors, and the
   share of step time the engine waits for data;
6. the cost model of the paper profile (FLOPs and activation memory of ResNet-50 at 164³; see ``cost_model.py``);
7. precision and memory layout on this CPU (issue 23.2): the encoder's forward + backward + AdamW step at the
   ``cpu`` profile's shape in fp32, bf16 autocast, ``channels_last_3d`` and both, and the downstream last stage +
   heads likewise; which bf16 units the CPU reports;
8. k-shot fine-tuning of one init: the grouped (batched) trainer against the one-at-a-time loop (issue 23.3);
9. screening throughput (issue 20): CTs per second through `screen`'s per-patient path (series QC, preprocessing,
   ten calibrated risks) at the ``cpu`` profile's size, first pass (cold) and second pass (files in the OS cache);
10. the paired seed-aware interval, draw counts against per-resample ranking (``bootstrap``);
11. levers of the ``cpu`` run time (``levers``): one thread vs all, a cached frozen-trunk encoding vs computing it,
    AdamW ``foreach`` vs single-tensor on k-shot runs (identity of results checked for the last two);
12. screening at the ``paper`` profile (``screening_paper``, issue 32.6): seconds per CT of a realistic series
    (512 × 512 × 300 int16 at 0.7 × 0.7 × 1 mm; the tiny scale a small one), NIfTI and a DICOM series, split into
    its stages — read, series QC, resample and crop to 164³ at 2 mm, ResNet-50 forward — so a job's size can be
    stated in CTs per hour per core (the ``screening`` benchmark's CTs per second are for 32³ synthetic volumes that
    need no resampling).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from xcardia.precision import bf16_small_grid_convolutions_ok, cpu_bf16_units, plan


def _sibling(name: str):
    """A module of this folder, loaded by path (the suite runs as a script or through ``python -m xcardia bench``,
    never with the repository on ``sys.path``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"xcardia_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Scale:
    """How much work each benchmark does."""

    name: str
    generation: tuple[tuple[int, int], ...]  # (shape, volumes)
    preprocess_volumes: int
    preprocess_164: int
    repeats: int
    bank_sizes: tuple[int, ...]
    engine_patients: int
    engine_batch: int
    cost_shapes: tuple[int, ...]


SCALES = {
    "full": Scale("full", ((32, 60), (64, 24), (164, 4)), 24, 4, 9, (20, 4096, 65536), 640, 16, (32, 48, 64)),
    "quick": Scale("quick", ((32, 30), (64, 10), (164, 2)), 10, 2, 5, (20, 4096, 65536), 400, 16, (32, 48)),
    "tiny": Scale("tiny", ((32, 4), (48, 2)), 3, 0, 2, (20, 256), 60, 8, (24,)),
}


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ 1. generation
def bench_generation(scale: Scale) -> dict:
    from xcardia.cohort.physiology import sample_patient
    from xcardia.cohort.render import RenderSpec, render_ct
    from xcardia.config import get_profile
    from xcardia.models.image_encoder import ImageEncoder

    out = {}
    for shape, n in scale.generation:
        spec = RenderSpec((shape,) * 3, 328.0 / shape if shape >= 100 else 6.0 * 32 / shape,
                          "chest" if shape >= 100 else "heart")
        t = time.perf_counter()
        for i in range(n):
            p = sample_patient(0, i)
            render_ct(p.anatomy, spec, np.random.default_rng([0, i, 1]))
        seconds = (time.perf_counter() - t) / n
        out[f"{shape}^3"] = {"seconds_per_volume": seconds, "volumes_per_second_per_worker": 1.0 / seconds}
    encoder = ImageEncoder(get_profile("smoke").model.image)
    x = torch.randn(16, 1, 32, 32, 32)
    opt = torch.optim.AdamW(encoder.parameters())

    def step():
        opt.zero_grad()
        encoder(x).pow(2).mean().backward()
        opt.step()

    batch = median_time(step, scale.repeats)
    out["smoke_encoder_batch16_step_seconds"] = batch
    if "32^3" in out:
        out["ratio_generate_16_volumes_32^3_vs_one_training_step"] = 16 * out["32^3"]["seconds_per_volume"] / batch
    return out


# ------------------------------------------------------------------------------------------ 2. preprocessing
def bench_preprocessing(scale: Scale, workdir: Path) -> dict:
    from xcardia.cohort.generate import save_nifti
    from xcardia.cohort.physiology import sample_patient
    from xcardia.cohort.render import RenderSpec, render_ct
    from xcardia.data.imaging import PreprocessCache, PreprocessSpec

    def write(n: int, spec: RenderSpec, folder: str) -> list[Path]:
        paths = []
        for i in range(n):
            p = sample_patient(1, i)
            ct = render_ct(p.anatomy, spec, np.random.default_rng([1, i, 1]))
            path = workdir / folder / f"{i}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_nifti(path, ct.hu, ct.affine)
            paths.append(path)
        return paths

    paths = write(scale.preprocess_volumes, RenderSpec((64, 64, 64), 3.0, "heart"), "ct64")
    pre = PreprocessSpec(shape=(32, 32, 32), spacing_mm=6.0)
    cache = PreprocessCache(workdir / "cache", pre)
    t = time.perf_counter()
    for p in paths:
        cache.load(p)
    cold = (time.perf_counter() - t) / len(paths)
    warm = median_time(lambda: [cache.load(p) for p in paths], scale.repeats, warmup=0) / len(paths)
    out = {"cold_seconds_per_volume": cold, "warm_seconds_per_volume": warm, "ratio_cold_vs_warm": cold / warm}
    if scale.preprocess_164:
        big = write(scale.preprocess_164, RenderSpec((164, 164, 164), 2.0, "chest"), "ct164")
        cache164 = PreprocessCache(workdir / "cache164", PreprocessSpec(shape=(164, 164, 164), spacing_mm=2.0))
        t = time.perf_counter()
        for p in big:
            cache164.load(p)
        seconds = (time.perf_counter() - t) / len(big)
        out["164^3_2mm_cold_volumes_per_second_per_worker"] = 1.0 / seconds
    return out


# ------------------------------------------------------------------------------------------ 3. clip loss
def textbook_clip(img: torch.Tensor, tab: torch.Tensor, tau: float) -> torch.Tensor:
    img, tab = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(tab, dim=1)
    logits = img @ tab.t() / tau
    target = torch.arange(len(img))
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target))


def bench_clip_loss(scale: Scale) -> dict:
    from xcardia.losses import clip_loss

    img = torch.randn(256, 256, requires_grad=True)
    tab = torch.randn(256, 256, requires_grad=True)

    def run(fn):
        return lambda: fn(img, tab, 0.07).backward()

    ours = median_time(run(clip_loss), scale.repeats * 4, warmup=3)
    textbook = median_time(run(textbook_clip), scale.repeats * 4, warmup=3)
    return {"clip_loss_seconds": ours, "textbook_seconds": textbook, "ratio_clip_loss_vs_textbook": ours / textbook}


# ------------------------------------------------------------------------------------------ 4. NW head overhead
def bench_nw_head(scale: Scale) -> dict:
    from xcardia.config import get_profile
    from xcardia.losses import clip_loss, masked_bce, nw_predict
    from xcardia.models.xcardia_model import XCardiaModel

    torch.manual_seed(0)
    prof = get_profile("smoke")
    model = XCardiaModel(replace(prof.model, proj_dim=256), n_tabular_features=40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.randn(32, 1, 32, 32, 32)
    values, missing = torch.randn(32, 40), torch.zeros(32, 40, dtype=torch.bool)
    concepts = (torch.rand(32, 4) < 0.3).float()

    def step(bank=None):
        def run():
            opt.zero_grad()
            e_img, e_tab = model(image, values, missing)
            loss = clip_loss(e_img, e_tab, 0.07)
            if bank is not None:
                pred, _ = nw_predict(XCardiaModel.nw_query(e_img, e_tab, "fused"), bank[0], bank[1], 0.1)
                loss = loss + 0.5 * masked_bce(pred, concepts)
            loss.backward()
            opt.step()
        return run

    clip_only = median_time(step(), scale.repeats)
    out = {"clip_only_step_seconds": clip_only}
    for size in scale.bank_sizes:
        bank = (torch.nn.functional.normalize(torch.randn(size, 256), dim=1), (torch.rand(size, 4) < 0.3).float())
        seconds = median_time(step(bank), scale.repeats)
        out[f"bank_{size}_step_seconds"] = seconds
        out[f"ratio_clip_nw_bank_{size}_vs_clip_only"] = seconds / clip_only
    return out


# ------------------------------------------------------------------------------------------ 5. engine
def bench_engine(scale: Scale, workdir: Path) -> dict:
    from xcardia.cohort.generate import CohortSpec, generate_cohort
    from xcardia.cohort.render import RenderSpec
    from xcardia.config import get_profile
    from xcardia.losses import clip_loss, masked_bce, nw_predict
    from xcardia.models.xcardia_model import XCardiaModel
    from xcardia.pretrain import pretrain, profile_run_specs

    prof = get_profile("smoke")
    spec = CohortSpec(n_patients=scale.engine_patients, seed=5, render=RenderSpec((32, 32, 32), 6.0, "heart"),
                      split_fractions=(0.8, 0.1, 0.1, 0.0))
    generate_cohort(workdir / "cohort", spec, progress=False)
    batch = scale.engine_batch
    model_spec, pre_spec = profile_run_specs(prof, "xcardia", epochs=2, batch_size=batch, bank_refresh_every=100)
    stamps: list[tuple[int, float]] = []
    pretrain(workdir / "cohort", workdir / "run", model_spec, pre_spec, prof.preprocess, cache_dir=workdir / "cache",
             progress=False, log=lambda *_: None, on_step=lambda epoch, step: stamps.append((epoch, time.perf_counter())))
    second = [t for e, t in stamps if e == 1]  # epoch 2: the cache is warm
    engine = statistics.median(np.diff(second))
    log = json.loads((workdir / "run" / "log.json").read_text())

    # the bare loop: the same model and loss on the same batches, already stacked in memory
    state = torch.load(workdir / "run" / "checkpoint.pt", weights_only=True)
    from xcardia.data.dataset import CohortDataset
    from xcardia.data.imaging import PreprocessCache
    from xcardia.data.manifest import load_manifest
    from xcardia.models.tabular_encoder import TabularPreprocessor
    from xcardia.pretrain import effective_model_spec

    manifest = load_manifest(workdir / "cohort")
    pre = TabularPreprocessor.from_state_dict(state["tabular"])
    rows = np.flatnonzero(manifest["split"].isin(["pretrain", "train"]).to_numpy())
    ds = CohortDataset(manifest, rows, PreprocessCache(workdir / "cache", prof.preprocess), pre.transform(manifest))
    batches = list(torch.utils.data.DataLoader(ds, batch_size=batch, drop_last=True))
    model = XCardiaModel(effective_model_spec(model_spec, pre_spec), len(pre.columns))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bank = (state["bank"]["embeddings"], state["bank"]["targets"])
    times = []
    for b in batches * 2:
        t = time.perf_counter()
        opt.zero_grad()
        e_img, e_tab = model(b["image"], b["tab_values"], b["tab_missing"])
        pred, _ = nw_predict(XCardiaModel.nw_query(e_img, e_tab, "fused"), bank[0], bank[1], model.nw_temperature())
        (clip_loss(e_img, e_tab, model.clip_temperature()) + 0.5 * masked_bce(pred, b["concepts"])).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    bare_step = statistics.median(times[len(batches):])
    return {"engine_step_seconds": engine, "bare_step_seconds": bare_step, "ratio_engine_vs_bare": engine / bare_step,
            "steps_timed": len(second) - 1, "data_wait_share": log[-1]["data_wait_share"]}


# ------------------------------------------------------------------------------------------ runner
# ------------------------------------------------------------------------------------------ 7. frozen trunk cache
def bench_finetune_cache(scale: Scale) -> dict:
    """One epoch of the paper's fine-tuning protocol (last ResNet stage + heads trained, the rest frozen) on
    activations of the frozen trunk computed once per encoder (what ``xcardia.finetune`` does) versus recomputing the
    frozen trunk for every batch, on the ``cpu`` profile's encoder and 32³ volumes."""
    from xcardia.config import get_profile
    from xcardia.finetune import TopModel
    from xcardia.losses import masked_bce_with_logits
    from xcardia.models.image_encoder import ImageEncoder

    profile = get_profile("cpu")
    torch.manual_seed(0)
    encoder = ImageEncoder(profile.model.image).eval()
    n = scale.engine_patients
    volumes = torch.randn(n, 1, *profile.preprocess.shape)
    labels = (torch.rand(n, 10) < 0.3).float()
    with torch.no_grad():
        trunk = torch.cat([encoder.trunk(volumes[i:i + 64]) for i in range(0, n, 64)])
    model = TopModel(encoder, 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = 32

    def epoch(recompute: bool):
        model.train()
        for i in range(0, n, batch):
            if recompute:
                with torch.no_grad():
                    x = encoder.trunk(volumes[i:i + batch])
            else:
                x = trunk[i:i + batch]
            loss = masked_bce_with_logits(model(x), labels[i:i + batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    cached = median_time(lambda: epoch(False), scale.repeats)
    recomputed = median_time(lambda: epoch(True), scale.repeats)
    return {"patients": n, "cached_epoch_s": cached, "recomputed_epoch_s": recomputed,
            "speedup_cached_vs_recomputed": recomputed / cached}


def bench_precision(scale: Scale) -> dict:
    """fp32 vs bf16 autocast vs channels_last_3d (and both) for a training step of the ``cpu`` profile's encoder
    (batch 32, 32³) and of the downstream last stage + heads on cached trunk activations (batch 12): ratios of
    step time against fp32 in the same run, interleaved repeats."""
    from xcardia.config import get_profile
    from xcardia.finetune import TopModel
    from xcardia.models.image_encoder import ImageEncoder

    profile = get_profile("cpu")
    torch.manual_seed(0)
    results = {"bf16_units": ",".join(cpu_bf16_units()) or "none"}
    x = torch.randn(32, 1, *profile.preprocess.shape)
    encoder = ImageEncoder(profile.model.image)
    with torch.no_grad():
        trunk = encoder.eval().trunk(x[:12])
    settings = {"fp32": (False, False), "bf16": (True, False), "channels_last": (False, True),
                "bf16_channels_last": (True, True)}

    results["bf16_small_grid_self_test"] = "passed" if bf16_small_grid_convolutions_ok() else "failed"

    def step_fn(model, inputs, bf16, channels_last):
        # as the runtime plans it: on a CPU whose bf16 small-grid convolution fails its self-test the encoder's
        # small-grid stages stay fp32 (the downstream top has no such guard: downstream training is fp32)
        precision = plan(torch.device("cpu"), bf16, channels_last)
        model, inputs = precision.model(model), precision.batch(inputs)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with precision.autocast():
                out = model(inputs)
            out.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    for part, (make, inputs) in {"encoder": (lambda: ImageEncoder(profile.model.image).train(), x),
                                 "downstream_top": (lambda: TopModel(encoder, 10).train(), trunk)}.items():
        steps = {name: step_fn(make(), inputs, *flags) for name, flags in settings.items()}
        times = {name: [] for name in settings}
        for fn in steps.values():
            fn()  # warm-up (oneDNN primitive creation)
        for _ in range(scale.repeats):  # interleaved, so a load change hits every setting alike
            for name, fn in steps.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["fp32"])
        results[part] = {f"{name}_step_ms": statistics.median(v) * 1000 for name, v in times.items()}
        results[part].update({f"speedup_{name}_vs_fp32": base / statistics.median(v)
                              for name, v in times.items() if name != "fp32"})
    return results


def bench_kshot_batching(scale: Scale) -> dict:
    """k-shot ``paper``-protocol runs of one init (k = 5, the ``cpu`` profile's encoder and epochs): the grouped
    trainer of :mod:`xcardia.batched` against the one-at-a-time loop, same members, same seeds."""
    from dataclasses import replace as _replace

    from xcardia.batched import predict_grouped, train_kshot_grouped
    from xcardia.config import get_profile
    from xcardia.finetune import EncodedInit, TopModel, predict_top, train_top
    from xcardia.models.image_encoder import ImageEncoder

    profile = get_profile("cpu")
    spec = _replace(profile.finetune, kshot_epochs=min(profile.finetune.kshot_epochs, 5 * scale.repeats))
    torch.manual_seed(0)
    encoder = ImageEncoder(profile.model.image).eval()
    n = 200
    with torch.no_grad():
        trunk = torch.cat([encoder.trunk(v) for v in torch.randn(n, 1, *profile.preprocess.shape).split(64)])
    init = EncodedInit("x", encoder, np.arange(n), trunk, np.zeros((n, 128)), {i: i for i in range(n)})
    rng = np.random.default_rng(0)
    members = 4 * scale.repeats
    jobs = [(rng.choice(150, 10, replace=False), seed) for seed in range(members)]
    labels = (rng.random((n, 1)) < 0.5).astype(float)
    test = torch.arange(150, n)
    t = time.perf_counter()
    for rows, seed in jobs:
        predict_top(train_top(init, labels, rows, None, spec, seed, epochs=spec.kshot_epochs), trunk[test])
    loop = time.perf_counter() - t
    t = time.perf_counter()
    built = []
    for _rows, seed in jobs:
        torch.manual_seed(seed)
        built.append(TopModel(encoder, 1, spec.reinit_feature, spec.train_batchnorm))
    model = train_kshot_grouped(built, trunk, [r for r, _ in jobs], [labels[r] for r, _ in jobs],
                                [s for _, s in jobs], spec, spec.kshot_epochs)
    predict_grouped(model, trunk[test])
    grouped = time.perf_counter() - t
    return {"runs": members, "epochs": spec.kshot_epochs, "loop_s": loop, "grouped_s": grouped,
            "speedup_grouped_vs_loop": loop / grouped}


def bench_screening(scale: Scale, workdir: Path) -> dict:
    """CTs per second through the screening path of one patient (QC + preprocessing + scoring), ``cpu`` profile
    size, a randomly initialised network (throughput does not depend on the weights)."""
    from xcardia.cohort.generate import generate_cohort
    from xcardia.config import get_profile
    from xcardia.data.manifest import load_manifest, resolve_ct_path
    from xcardia.schema import LABELS
    from xcardia.screening import ScreeningInput, _Prepared, score
    from xcardia.bundle import ScreeningNetwork

    profile = get_profile("cpu")
    n = max(4, scale.preprocess_volumes)
    cohort = replace(profile.cohort, n_patients=n, write_labelmap=False)
    generate_cohort(workdir / "cohort", cohort, workers=1, progress=False)
    manifest = load_manifest(workdir / "cohort")
    inputs = [ScreeningInput(str(pid), resolve_ct_path(manifest, str(path)))
              for pid, path in zip(manifest["patient_id"], manifest["ct_path"])]
    torch.manual_seed(0)
    none = {"method": "none"}
    nan_point = {"threshold": None, "sensitivity": None, "specificity": None}
    bundle = {"network": ScreeningNetwork(profile.model.image.to_dict()).eval(), "bank": None,
              "inference": {"calibration": {t: none for t in LABELS},
                            "operating_points": {t: {"sensitivity_90": nan_point, "specificity_90": nan_point}
                                                 for t in LABELS}}}
    prepared = _Prepared(inputs, profile.preprocess, ("error", "contrast"))

    def one_pass():
        for i in range(len(prepared)):
            item = prepared[i]
            if item["reason"] is None:
                score(bundle, item["volume"])

    t = time.perf_counter()
    one_pass()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    one_pass()
    warm = time.perf_counter() - t
    return {"cts": n, "cold_cts_per_s": n / cold, "warm_cts_per_s": n / warm}


def _chest_series(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """A chest-like int16 HU volume (X, Y, Z): air, a body ellipse of soft tissue, two lungs, a heart, a spine —
    enough for the series QC of a real chest CT; its content does not change the timings."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    plane = np.full(shape[:2], -1000, np.int16)
    plane[(x / 0.9) ** 2 + (y / 0.65) ** 2 < 1] = 40
    for cx in (-0.4, 0.4):
        plane[((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -850
    plane[((x + 0.05) / 0.2) ** 2 + ((y + 0.1) / 0.2) ** 2 < 1] = 45
    plane[(x / 0.08) ** 2 + ((y - 0.5) / 0.08) ** 2 < 1] = 700
    rng = np.random.default_rng(0)
    volume = np.repeat(plane[:, :, None], shape[2], axis=2)
    return (volume + rng.normal(0, 15, shape)).astype(np.int16)


def bench_screening_paper(scale: Scale, workdir: Path) -> dict:
    """Seconds per CT through screening at the ``paper`` profile's preprocessing (164³ at 2 mm) and encoder
    (ResNet-50), for a NIfTI file and a DICOM series of the same realistic size, stage by stage."""
    import nibabel as nib

    from xcardia.bundle import ScreeningNetwork
    from xcardia.config import get_profile
    from xcardia.data.imaging import load_ras, preprocess_ct
    from xcardia.data.qc import series_qc

    profile = get_profile("paper")
    full = scale.name != "tiny"
    shape, spacing = ((512, 512, 300), (0.7, 0.7, 1.0)) if full else ((96, 96, 60), (3.5, 3.5, 5.0))
    volume = _chest_series(shape, spacing)
    nifti = workdir / "chest.nii.gz"
    image = nib.Nifti1Image(volume, np.diag([*spacing, 1.0]))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    nib.save(image, str(nifti))
    dicom = workdir / "series"
    _write_dicom(dicom, volume, spacing)
    network = ScreeningNetwork(profile.model.image.to_dict()).eval()
    spec = profile.preprocess
    out = {"series_shape": list(shape), "series_spacing_mm": list(spacing), "target": f"{spec.shape[0]}³ at {spec.spacing_mm} mm",
           "encoder": profile.model.image.arch}
    for kind, path in (("nifti", nifti), ("dicom", dicom)):
        t0 = time.perf_counter()
        img = load_ras(path, spec)
        t1 = time.perf_counter()
        findings = series_qc(img.as_tensor().numpy()[0], tuple(float(abs(z)) for z in img.pixdim))
        t2 = time.perf_counter()
        prepared = preprocess_ct(path, spec, loaded=img)
        t3 = time.perf_counter()
        with torch.no_grad():
            network(torch.as_tensor(prepared)[None, None])
        t4 = time.perf_counter()
        stages = {"read_s": t1 - t0, "qc_s": t2 - t1, "resample_crop_s": t3 - t2, "forward_s": t4 - t3}
        total = sum(stages.values())
        out[kind] = {**stages, "total_s": total, "cts_per_hour": 3600.0 / total,
                     "cts_per_hour_per_core": 3600.0 / total / torch.get_num_threads(),
                     "dominant_stage": max(stages, key=stages.get), "qc_errors": [f[1] for f in findings if f[0] == "error"]}
    return out


def _write_dicom(folder: Path, volume: np.ndarray, spacing) -> None:
    """An axial CT series (one file per slice, HU via RescaleSlope/Intercept) for the screening benchmark."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, series
        ds.Modality, ds.PatientID, ds.StudyInstanceUID = "CT", "bench", series
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"{k:04d}.dcm"), enforce_file_format=True)


def bench_bootstrap(scale: Scale) -> dict:
    """The paired seed-aware interval of notebooks 04/05 (3 seeds × 2 arms × runs × 10 tasks, 1,000 patient
    resamples, missing labels): the draw-count path of :mod:`xcardia.metrics` against the previous path, which ranked
    every resample and looped over resamples whenever a task had unlabelled patients (kept here as the baseline).
    Both give the same interval to the last bit (checked here)."""
    from unittest import mock

    from xcardia import metrics

    rng = np.random.default_rng(0)
    n, tasks, runs, seeds = (240, 10, 3, 3) if scale.name != "tiny" else (80, 4, 2, 2)
    y = (rng.random((n, tasks)) < 0.3).astype(float)
    y[rng.random((n, tasks)) < 0.2] = np.nan
    arms = [[rng.random((runs, n, tasks)) for _ in range(seeds)] for _ in range(2)]

    def previous(labels, scores, idx, counts):  # one ranking per resample, a Python loop over resamples
        labels, scores = labels[idx], scores[idx]
        out = np.empty(labels.shape[0])
        for i in range(labels.shape[0]):
            keep = ~np.isnan(labels[i])
            out[i] = metrics.auroc_many(labels[i, keep][None], scores[i, keep][None])[0]
        return out

    interval = lambda: metrics.seed_aware_interval(y, arms[0], arms[1], n_boot=1000, seed=0)  # noqa: E731
    repeats = max(1, scale.repeats // 2)
    fast = median_time(interval, repeats)
    fast_result = interval()
    with mock.patch.object(metrics, "_resampled_auroc", previous):
        slow = median_time(interval, 1, warmup=0)
        slow_result = interval()
    return {"patients": n, "tasks": tasks, "runs_per_seed": runs, "seeds": seeds, "interval_s": fast,
            "previous_interval_s": slow, "speedup_vs_previous": slow / fast,
            "identical_to_previous": fast_result == slow_result}


def bench_levers(scale: Scale) -> dict:
    """Three levers of the ``cpu`` profile's run time (issue 23), each against its baseline in the same run:
    the encoder's training step on one thread vs two (can two runs side by side gain?); reading an init's frozen-trunk
    encoding from ``<cache>/encoded/`` vs computing it (random volumes, ``cpu`` encoder), with the identity of the
    two checked; k-shot ``paper``-protocol runs with AdamW ``foreach`` vs single-tensor, weights compared."""
    import tempfile
    from unittest import mock

    from xcardia import finetune
    from xcardia.config import get_profile
    from xcardia.models.image_encoder import ImageEncoder

    profile = get_profile("cpu")
    torch.manual_seed(0)
    results = {}
    # threads
    encoder = ImageEncoder(profile.model.image).train()
    x = torch.randn(32, 1, *profile.preprocess.shape)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)

    def step():
        encoder(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    threads = torch.get_num_threads()
    times = {1: [], threads: []}
    step()
    for _ in range(max(2, scale.repeats // 2)):
        for n in times:
            torch.set_num_threads(n)
            t = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    results["threads"] = threads
    results["one_thread_step_vs_all_threads"] = statistics.median(times[1]) / statistics.median(times[threads])
    # encoding reuse
    n = 40 if scale.name == "tiny" else 400

    class Volumes(torch.utils.data.Dataset):
        rows = np.arange(n)
        _v = torch.randn(n, 1, *profile.preprocess.shape, generator=torch.Generator().manual_seed(1))

        def __len__(self):
            return n

        def image(self, i):
            return self._v[i, 0].numpy()

        def __getitem__(self, i):
            return {"image": self._v[i]}
    encoder.eval()
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        computed = finetune.encode_cached("x", encoder, Volumes(), root, log=lambda *_: None)
        compute_s = time.perf_counter() - t
        t = time.perf_counter()
        read = finetune.encode_cached("x", encoder, Volumes(), root, log=lambda *_: None)
        read_s = time.perf_counter() - t
    results.update(encode_patients=n, encode_computed_s=compute_s, encode_read_s=read_s,
                   encode_speedup_read_vs_computed=compute_s / read_s,
                   encode_read_identical=bool(torch.equal(computed.trunk, read.trunk)
                                              and np.array_equal(computed.features, read.features)))
    # AdamW foreach
    with torch.no_grad():
        trunk = computed.trunk
    init = finetune.EncodedInit("x", encoder, np.arange(n), trunk, computed.features, {i: i for i in range(n)})
    labels = (np.random.default_rng(0).random((n, 1)) < 0.5).astype(float)
    members = 3 if scale.name == "tiny" else 15
    rows = [np.random.default_rng(m).choice(n, 10, replace=False) for m in range(members)]
    real = torch.optim.AdamW
    weights, took = {False: [], True: []}, {False: 0.0, True: 0.0}
    for m, r in enumerate(rows):  # interleaved, so a load change hits both alike
        for foreach in (False, True):
            with mock.patch.object(torch.optim, "AdamW", lambda *a, f=foreach, **k: real(*a, **{**k, "foreach": f})):
                t = time.perf_counter()
                weights[foreach].append(finetune.train_top(init, labels, r, None, profile.finetune, seed=m,
                                                           epochs=profile.finetune.kshot_epochs).state_dict())
                took[foreach] += time.perf_counter() - t
    results.update(kshot_runs=members, kshot_single_tensor_s=took[False], kshot_foreach_s=took[True],
                   kshot_speedup_foreach=took[False] / took[True],
                   kshot_foreach_identical=all(torch.equal(a[k], b[k]) for a, b in zip(weights[False], weights[True])
                                               for k in a))
    return results


BENCHMARKS = {
    "bootstrap": lambda s, d: bench_bootstrap(s),
    "levers": lambda s, d: bench_levers(s),
    "screening": bench_screening,
    "screening_paper": bench_screening_paper,
    "precision": lambda s, d: bench_precision(s),
    "kshot_batching": lambda s, d: bench_kshot_batching(s),
    "finetune_cache": lambda s, d: bench_finetune_cache(s),
    "generation": lambda s, d: bench_generation(s),
    "preprocessing": bench_preprocessing,
    "clip_loss": lambda s, d: bench_clip_loss(s),
    "nw_head": lambda s, d: bench_nw_head(s),
    "engine": bench_engine,
    "cost_model": lambda s, d: _sibling("cost_model").cost_model(s.cost_shapes),
}

#: Goals stated in the issues (a ratio below the goal is a pass; informative, never a test).
GOALS = {
    ("nw_head", "ratio_clip_nw_bank_4096_vs_clip_only"): ("≤", 1.10),
    ("clip_loss", "ratio_clip_loss_vs_textbook"): ("≤", 1.0),
    ("engine", "ratio_engine_vs_bare"): ("≤", 1.15),
    ("preprocessing", "ratio_cold_vs_warm"): ("≥", 10.0),
    ("generation", "64^3"): ("≥ vol/s", 10.0),
}


def run(scale_name: str = "full", only=None, log=print) -> dict:
    scale = SCALES[scale_name]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"scale": scale_name, "torch_threads": torch.get_num_threads(), "benchmarks": {}}
    with tempfile.TemporaryDirectory(prefix="xcardia-bench-") as tmp:
        for name, fn in BENCHMARKS.items():
            if only and name not in only:
                continue
            log(f"[bench] {name} ...")
            t = time.perf_counter()
            workdir = Path(tmp) / name
            workdir.mkdir()
            results["benchmarks"][name] = fn(scale, workdir)
            results["benchmarks"][name]["benchmark_seconds"] = time.perf_counter() - t
    return results


def _flatten(prefix: str, value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(f"{prefix}.{k}" if prefix else k, v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _flatten(f"{prefix}[{i}]", v)
    else:
        yield prefix, value


def format_table(results: dict) -> str:
    lines = [f"xcardia benchmarks (scale {results['scale']}, {results['torch_threads']} torch threads)", ""]
    for name, values in results["benchmarks"].items():
        lines.append(f"{name}:")
        for key, value in _flatten("", values):
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            goal = GOALS.get((name, key.split(".")[0]))
            lines.append(f"  {key:66s} {text}" + (f"   (goal {goal[0]} {goal[1]})" if goal else ""))
    return "\n".join(lines)
