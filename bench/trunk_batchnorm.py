"""How should the frozen trunk's BatchNorm be treated? The ``paper`` protocol's cached trunk against the public
loop's exact semantic, for every init kind, with 5 shots and with all labels (issue 30.1, register D3).

    python bench/trunk_batchnorm.py --out /tmp/trunk_bn --json bench/results/trunk_batchnorm.json

The public loop calls ``model_engine.train()`` on the whole network (``Finetuning.py:556``): the frozen stem and
layer1–3 normalise each 12-sample micro-batch with its own statistics and move their running statistics toward the
fine-tuning data, which eval mode then uses on validation and test. The ``paper`` protocol computes the frozen trunk
once per init and caches it. Treatments compared (``FinetuneSpec.trunk_batchnorm``), cheapest first:

- ``init``: the init's own statistics, eval mode (the reference runs before issue 30; for a scratch init mean 0 /
  variance 1, i.e. no normalisation);
- ``train_split``: statistics re-estimated once per init on the training split's volumes (micro-batches of 12),
  then cached (:func:`xcardia.finetune.reestimate_trunk_batchnorm`);
- ``exact`` (the reference, too costly for the thousands of runs of a reproduction): the public semantic itself,
  every volume through the whole network in training mode at every step
  (:func:`xcardia.finetune.train_frozen_trunk_network`).

Setting: a cohort of the ``cpu`` profile's specification with ``--patients`` patients (default 1,000, as the issue's
pilot), one encoder per pretrained method (``clip``, ``xcardia_paper``, ``xcardia_fixed``, seed 0, ``--pretrain-epochs``
epochs) and three scratch inits; the ``cpu`` profile's fine-tuning spec (k-shot schedule as committed in D9). 5 shots:
``--draws`` draws per task (draw seeds 0…, the same draws for every init and treatment), macro over the tasks drawn,
mean over draws. All labels: the labelled training split, fine-tuning seed 123, early stopping on validation, macro
over the tasks with both classes in test. Resumable: the cohort and the pretraining runs are reused when finished.

**Decision rule** (committed before the first run of this script; the tolerance was chosen after reading the issue's
pilot table, which every reader of the issue has seen, and before any number of this benchmark existed): the ``paper``
protocol adopts the cheapest cached treatment whose macro AUROC is within **0.02 at 5 shots** and **0.01 with all
labels** of the exact semantic's, for every init kind (scratch: mean over its three inits; each pretrained method:
its encoder). 0.02 is below the half-width of every 5-shot interval of the committed reference (0.021–0.048) and
0.01 below a quarter of the all-label ones, so a treatment inside the tolerance cannot by itself move a verdict. If
no cached treatment meets it, the one closest to the exact semantic for the most init kinds is adopted and the
remaining gap is stated in D3 with its size (the exact semantic is not affordable for a CPU reproduction). The
script prints the verdict; the default is changed (or not) by hand, in its own commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

TREATMENTS = ("init", "train_split", "exact")
PRETRAINED = ("clip_s0", "xcardia_paper_s0", "xcardia_fixed_s0")
SCRATCH = ("scratch_s0", "scratch_s1", "scratch_s2")
TOLERANCE = {"kshot5": 0.02, "all_labels": 0.01}


def kind_of(init: str) -> str:
    return init.rsplit("_s", 1)[0]


def summarise(scores: dict, facts: dict) -> dict:
    """The table, the gaps to the exact semantic and the verdict of the decision rule, from the per-init scores; prints
    them. Fallback when no cached treatment is within the tolerance ("the one closest to the exact semantic for the
    most init kinds"): per init kind, the treatment closer to the exact semantic on both settings; the one that is so
    for more kinds is adopted (a tie: the smaller sum of absolute gaps).

    The first run's script counted only the kinds where ``train_split`` was closer on both settings and adopted it
    only with a strict majority of all kinds — a tie-break toward ``init`` the rule's text does not contain; its
    verdict is kept in the record as ``verdict_as_first_computed`` (issue 30, ``bench/results/trunk_batchnorm.json``)."""
    import numpy as np

    kinds = list(dict.fromkeys(kind_of(n) for n in scores["exact"]))
    table = {t: {k: {s: float(np.mean([scores[t][n][s] for n in scores[t] if kind_of(n) == k])) for s in TOLERANCE}
                 for k in kinds} for t in TREATMENTS}
    gaps = {t: {k: {s: round(table[t][k][s] - table["exact"][k][s], 4) for s in TOLERANCE} for k in kinds}
            for t in ("init", "train_split")}
    within = {t: all(abs(gaps[t][k][s]) <= TOLERANCE[s] for k in kinds for s in TOLERANCE) for t in gaps}
    adopted = next((t for t in ("init", "train_split") if within[t]), None)
    if adopted is None:
        closer = {t: sum(all(abs(gaps[t][k][s]) < abs(gaps[o][k][s]) for s in TOLERANCE) for k in kinds)
                  for t, o in (("init", "train_split"), ("train_split", "init"))}
        total = {t: sum(abs(gaps[t][k][s]) for k in kinds for s in TOLERANCE) for t in gaps}
        adopted = max(gaps, key=lambda t: (closer[t], -total[t]))
        verdict = (f"no cached treatment within the tolerance; adopt the closest, {adopted} (closer on both settings "
                   f"for {closer[adopted]} init kind(s) against {closer['init' if adopted == 'train_split' else 'train_split']}; "
                   f"sum of absolute gaps init {total['init']:.3f}, train_split {total['train_split']:.3f}), and state "
                   f"the gap in D3")
    else:
        verdict = f"adopt {adopted}"
    print(f"\ntrunk BatchNorm, {facts.get('patients')} patients (cpu specification), {facts.get('draws')} draws × tasks "
          f"at k={facts.get('k')}, pretraining {facts.get('pretrain_epochs')} epochs")
    print(f"{'treatment':>12} {'init kind':>14} {'5-shot':>8} {'Δ exact':>8} {'all labels':>11} {'Δ exact':>8}")
    for t in TREATMENTS:
        for k in kinds:
            g = gaps.get(t, {}).get(k, {"kshot5": 0.0, "all_labels": 0.0})
            print(f"{t:>12} {k:>14} {table[t][k]['kshot5']:>8.3f} {g['kshot5']:>+8.3f} {table[t][k]['all_labels']:>11.3f} "
                  f"{g['all_labels']:>+8.3f}")
    pretrained_gap = {t: {k: round(table[t][k]["kshot5"] - table[t]["scratch"]["kshot5"], 4) for k in kinds if k != "scratch"}
                      for t in TREATMENTS}
    print("pretrained − scratch at 5 shots:", json.dumps(pretrained_gap))
    print(f"within tolerance (5-shot {TOLERANCE['kshot5']}, all labels {TOLERANCE['all_labels']}): {within}")
    print(f"verdict: {verdict}")
    return {**facts, "tolerance": TOLERANCE, "scores": scores, "table": table, "gaps_to_exact": gaps,
            "pretrained_minus_scratch_kshot5": pretrained_gap, "within_tolerance": within, "verdict": verdict,
            "adopted": adopted}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the cohort, the runs and the cache (resumable)")
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--summarise", help="recompute the table and verdict from a results file's scores (no runs)")
    args = parser.parse_args(argv)
    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        facts = {k: v for k, v in saved.items() if k in ("patients", "pretrain_epochs", "draws", "k", "n_draw_tasks",
                                                          "timing_s", "verdict_as_first_computed")}
        facts.setdefault("verdict_as_first_computed", saved.get("verdict"))
        result = summarise(saved["scores"], facts)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0

    import numpy as np
    import torch

    from xcardia.cohort.generate import generate_cohort
    from xcardia.config import get_profile
    from xcardia.data.dataset import CohortDataset
    from xcardia.data.manifest import load_manifest
    from xcardia.finetune import (build_init, kshot_subset, labelled_rows, predict_top, prepare_experiment,
                                  train_frozen_trunk_network, train_top)
    from xcardia.finetune import macro_auroc as macro  # the public macro: tasks with both classes in test
    from xcardia.pretrain import pretrain_profile_run
    from xcardia.schema import LABELS

    torch.set_num_threads(max(1, torch.get_num_threads()))
    profile = get_profile("cpu")
    out = Path(args.out)
    started = time.perf_counter()
    manifest_path = generate_cohort(out / "cohort", replace(profile.cohort, n_patients=args.patients), workers=2,
                                    progress=False)
    inits = {name: f"scratch:{name[-1]}" for name in SCRATCH}
    for name in PRETRAINED:
        inits[name] = str(pretrain_profile_run(profile, name, manifest_path, out / "runs", out / "cache",
                                               progress=False, log=lambda *_: None, epochs=args.pretrain_epochs))
    setup_s = time.perf_counter() - started
    manifest = load_manifest(manifest_path)
    base = profile.finetune
    scores: dict = {t: {} for t in TREATMENTS}
    timing: dict = {t: 0.0 for t in TREATMENTS}
    exp = None
    for treatment in ("init", "train_split"):
        spec = replace(base, trunk_batchnorm=treatment)
        t0 = time.perf_counter()
        exp = prepare_experiment(profile, manifest, inits, out / "cache", spec, log=lambda *_: None)
        labels, test = exp.labels, exp.rows["test"]
        train, val = labelled_rows(labels, exp.rows["train"]), exp.rows["val"]
        draws = [(t, d, kshot_subset(labels, exp.rows["train"], t, args.k, d)[0]) for t in range(len(LABELS))
                 for d in range(args.draws)]
        draws = [(t, d, rows) for t, d, rows in draws if rows is not None]
        for name, init in exp.inits.items():
            test_trunk = init.trunk[torch.as_tensor(init.at(test))]
            per_draw = {}
            for t, d, rows in draws:
                model = train_top(init, labels[:, [t]], rows, None, spec, d, epochs=spec.kshot_epochs)
                per_draw.setdefault(d, {})[t] = predict_top(model, test_trunk)[:, 0]
            kshot = [macro(labels[test][:, sorted(p)], np.stack([p[t] for t in sorted(p)], 1)) for p in per_draw.values()]
            full = predict_top(train_top(init, labels, train, val, spec, 123), test_trunk)
            scores[treatment][name] = {"kshot5": float(np.mean(kshot)), "all_labels": macro(labels[test], full)}
            print(f"[trunk-bn] {treatment:>11} {name:>18}: {scores[treatment][name]}", flush=True)
        timing[treatment] = round(time.perf_counter() - t0, 1)

    spec = base
    t0 = time.perf_counter()
    labels, test = exp.labels, exp.rows["test"]
    train, val = labelled_rows(labels, exp.rows["train"]), exp.rows["val"]
    ds = exp.datasets
    test_ds = ds["test"]
    for name, source in inits.items():
        encoder = build_init(source, profile.model.image, profile.preprocess, 0)
        per_draw = {}
        for t, d, rows in draws:
            p = train_frozen_trunk_network(encoder, CohortDataset.from_parts([ds["train"]], rows), None, test_ds,
                                           labels[:, [t]], spec, d, epochs=spec.kshot_epochs)
            per_draw.setdefault(d, {})[t] = p[:, 0]
        kshot = [macro(labels[test][:, sorted(p)], np.stack([p[t] for t in sorted(p)], 1)) for p in per_draw.values()]
        full = train_frozen_trunk_network(encoder, CohortDataset.from_parts([ds["train"]], train), ds["val"], test_ds,
                                          labels, spec, 123)
        scores["exact"][name] = {"kshot5": float(np.mean(kshot)), "all_labels": macro(labels[test], full)}
        print(f"[trunk-bn] {'exact':>11} {name:>18}: {scores['exact'][name]}", flush=True)
    timing["exact"] = round(time.perf_counter() - t0, 1)

    result = summarise(scores, {"patients": args.patients, "pretrain_epochs": args.pretrain_epochs,
                                "draws": args.draws, "k": args.k, "n_draw_tasks": len({t for t, _, _ in draws}),
                                "timing_s": {"setup": round(setup_s, 1), **timing}})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
