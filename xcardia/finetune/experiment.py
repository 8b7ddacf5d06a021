"""The experiment driver: one evaluation's data and encoded inits (:class:`Experiment`), the label-fraction sweep
and true k-shot over every init, the per-task records and the test predictions they are computed from."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from xcardia.atomic import write_atomic
from xcardia.data.dataset import CohortDataset, table_array
from xcardia.data.imaging import PreprocessCache, PreprocessSpec
from xcardia.errors import XcardiaError
from xcardia.finetune.encoding import EncodedInit, _volumes_digest, build_init, encode_cached, refuse_unfinished
from xcardia.finetune.probe import linear_probe
from xcardia.finetune.protocol import TopModel, predict_top, train_top
from xcardia.finetune.whole_network import train_scratch_all
from xcardia.finetune.subsets import fraction_subset, kshot_draw_seed, kshot_subset, labelled_rows
from xcardia.metrics import auprc, auroc
from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec
from xcardia.schema import LABELS
from xcardia.specs import FinetuneSpec


@dataclass
class Experiment:
    """Everything an evaluation run shares: manifest, splits, labels, preprocessed data and encoded inits."""

    manifest: pd.DataFrame
    image_spec: ImageEncoderSpec
    preprocess: PreprocessSpec
    cache: PreprocessCache
    spec: FinetuneSpec
    labels: np.ndarray = None
    rows: dict = None
    datasets: dict = None
    inits: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    _volumes_digest: str | None = None

    def __post_init__(self):
        split = self.manifest["split"].astype(str)
        self.rows = {s: np.flatnonzero((split == s).to_numpy()) for s in ("train", "val", "test")}
        if len(self.rows["test"]) == 0:
            raise XcardiaError("the manifest has no test patients; evaluation needs a test split")
        if len(self.rows["val"]) == 0:
            raise XcardiaError("the manifest has no val patients; the paper protocol stops early on validation macro "
                               "AUROC (Finetuning.py:590-616): give some patients split 'val'")
        self.labels = table_array(self.manifest, LABELS)
        self.datasets = {s: CohortDataset(self.manifest, r, self.cache, None, None, 0, in_memory=True)
                         for s, r in self.rows.items()}

    def add_init(self, name: str, encoder: ImageEncoder, log=print) -> EncodedInit:
        """Encode ``name`` on train + val + test (reusing the encoding cache under the preprocessing cache's
        folder when it holds these weights on these volumes), the frozen trunk's BatchNorm statistics treated as
        ``spec.trunk_batchnorm`` says (re-estimated on the training split's volumes, or the init's own)."""
        union = CohortDataset.from_parts([self.datasets[s] for s in ("train", "val", "test")])  # volumes in RAM
        if self._volumes_digest is None:
            self._volumes_digest = _volumes_digest(union)
        batchnorm_data = self.datasets["train"] if self.spec.trunk_batchnorm == "train_split" else None
        self.inits[name] = encode_cached(name, encoder, union, self.cache.root if self.cache is not None else None,
                                         self._volumes_digest, log, batchnorm_data, self.spec.batch_size)
        return self.inits[name]

    def test_labels(self) -> np.ndarray:
        return self.labels[self.rows["test"]]


def task_record(protocol, init, setting, value, seed, task_index, y_test, p, n_train_pos, n_train_neg, skipped=None,
                p_public=None) -> dict:
    """One task's test scores of one run. Two AUROCs, for the two macro definitions (issue 30.4):

    - ``auroc``: NaN when the training subset lacks a class (a head that never saw a class is not scored) or
      test does — the companion's macro over the tasks trained and scored;
    - ``auroc_public``: the public code's (``Finetuning.py:504-521``): every task with both classes in test is
      scored, a task its subset could not train included, from the head the loop trained on that subset as the
      public loop would (``p_public``: those predictions; default ``p``).
    """
    task = LABELS[task_index]
    y = y_test[:, task_index]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    reason = skipped or ("no positive in the training subset" if not n_train_pos else
                         "no negative in the training subset" if not n_train_neg else
                         None if n_pos and n_neg else "no positives in test" if not n_pos else "no negatives in test")
    p_public = p if p_public is None else p_public
    if not (n_train_pos and n_train_neg):  # a head that never saw a class is not scored, nor counted in a macro
        p = None
    return {"protocol": protocol, "init": init, "setting": setting, "value": value, "seed": seed, "task": task,
            "auroc": auroc(y, p) if p is not None else math.nan, "auprc": auprc(y, p) if p is not None else math.nan,
            "auroc_public": auroc(y, p_public) if p_public is not None else math.nan,
            "n_pos": n_pos, "n_neg": n_neg, "n_train_pos": n_train_pos, "n_train_neg": n_train_neg,
            "skipped": reason}


def run_fraction_sweep(exp: Experiment, log=print, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """The paper's sweep: every init × fraction × seed with the ``paper`` protocol and the linear probe, plus the
    ``scratch_all`` baseline on its fractions. Returns the per-task records and test predictions keyed by
    ``(protocol, init, fraction, seed)``."""
    from xcardia.progress import bar as tqdm

    spec, y_test, records, predictions = exp.spec, exp.test_labels(), [], {}
    train, val, test = labelled_rows(exp.labels, exp.rows["train"]), exp.rows["val"], exp.rows["test"]
    jobs = [(f, s) for f in spec.fractions for s in spec.fraction_seeds]
    for name, init in exp.inits.items():
        started = time.perf_counter()
        for fraction, seed in tqdm(jobs, desc=f"fine-tuning {name}", disable=not progress):
            subset = fraction_subset(train, fraction, seed)
            counts = [(int((exp.labels[subset, t] == 1).sum()), int((exp.labels[subset, t] == 0).sum())) for t in range(len(LABELS))]
            model = train_top(init, exp.labels, subset, val, spec, seed)
            p_paper = predict_top(model, init.trunk[torch.as_tensor(init.at(test))])
            p_probe = np.stack([linear_probe(init.features[init.at(subset)], exp.labels[subset, t],
                                             init.features[init.at(test)], spec.probe_c) for t in range(len(LABELS))], 1)
            untrainable = [t for t, (pos, neg) in enumerate(counts) if not (pos and neg)]
            p_trained = p_paper.copy()
            p_trained[:, untrainable] = np.nan  # issue 22: such tasks are skipped with their reason in `auroc`
            for protocol, p, p_public in (("paper", p_trained, p_paper), ("probe", p_probe, p_probe)):
                predictions[(protocol, name, fraction, seed)] = p
                for t in range(len(LABELS)):
                    records.append(task_record(protocol, name, "fraction", fraction, seed, t, y_test, p[:, t], *counts[t],
                                               p_public=p_public[:, t]))
        exp.timing.setdefault("per_init_s", {})[name] = round(time.perf_counter() - started, 2)
        log(f"[finetune] {name}: {len(jobs)} fraction runs done")
    from xcardia.reporting import group_of

    scratch_names = [n for n in exp.inits if group_of(n) == "scratch"]
    if scratch_names:  # the paper's scratch policy, once (it retrains the whole network: the costliest protocol)
        started = time.perf_counter()
        for fraction in spec.scratch_all_fractions:
            for seed in spec.scratch_all_seeds:
                subset = fraction_subset(train, fraction, seed)
                ds_train = CohortDataset.from_parts([exp.datasets["train"]], subset)
                p = train_scratch_all(exp.manifest, ds_train, exp.datasets["val"], exp.datasets["test"], exp.image_spec,
                                      exp.labels, spec, seed)
                p_public = p.copy()
                for t in range(len(LABELS)):
                    counts = (int((exp.labels[subset, t] == 1).sum()), int((exp.labels[subset, t] == 0).sum()))
                    if not all(counts):
                        p[:, t] = np.nan
                    records.append(task_record("scratch_all", scratch_names[0], "fraction", fraction, seed, t, y_test,
                                               p[:, t], *counts, p_public=p_public[:, t]))
                predictions[("scratch_all", scratch_names[0], fraction, seed)] = p
        exp.timing["scratch_all_s"] = round(time.perf_counter() - started, 2)
        log("[finetune] scratch with every layer trainable: done")
    return pd.DataFrame(records), predictions


def run_kshot(exp: Experiment, log=print, progress: bool = False) -> tuple[pd.DataFrame, dict, dict]:
    """True k-shot: per task, k positives + k negatives from the training split, ``kshot_seeds`` draws per
    pretraining seed (draw d of seed K uses :func:`kshot_draw_seed`), the same subsets for every init of a seed.
    Returns records, test predictions keyed by ``(protocol, init, k, draw, task)``, and the sampled patient ids
    ``{"sK": {task: {k: {draw: [ids]}}}}``."""
    from xcardia.progress import bar as tqdm

    from xcardia.reporting import seed_of

    spec, y_test, records, predictions = exp.spec, exp.test_labels(), [], {}
    train, test = exp.rows["train"], exp.rows["test"]
    ids = exp.manifest["patient_id"].to_numpy()
    subsets: dict = {}
    draws: dict = {}  # seed offset → {(task, k, draw): (rows, reason)}
    for offset in sorted({seed_of(name) for name in exp.inits} or {0}):
        for t, task in enumerate(LABELS):
            for k in spec.ks:
                for draw in range(spec.kshot_seeds):
                    rows, reason = kshot_subset(exp.labels, train, t, k, kshot_draw_seed(draw, offset))
                    draws.setdefault(offset, {})[(t, k, draw)] = (rows, reason)
                    subsets.setdefault(f"s{offset}", {}).setdefault(task, {}).setdefault(str(k), {})[str(draw)] = (
                        [str(i) for i in ids[rows]] if rows is not None else {"skipped": reason})
    for name, init in exp.inits.items():
        started = time.perf_counter()
        grouped = _kshot_paper_grouped(init, exp, draws[seed_of(name)], test) if spec.batched_kshot else {}
        for (t, k, seed), (rows, reason) in tqdm(draws[seed_of(name)].items(), desc=f"k-shot {name}",
                                                 disable=not progress):
            for protocol in spec.kshot_protocols:
                if protocol == "paper" and k not in spec.kshot_paper_ks:
                    continue
                if rows is None:
                    records.append(task_record(protocol, name, "kshot", k, seed, t, y_test, None, 0, 0, skipped=reason))
                    continue
                if protocol == "probe":
                    p = linear_probe(init.features[init.at(rows)], exp.labels[rows, t], init.features[init.at(test)], spec.probe_c)
                elif (t, k, seed) in grouped:
                    p = grouped[(t, k, seed)]
                else:
                    model = train_top(init, exp.labels[:, [t]], rows, None, spec, seed, epochs=spec.kshot_epochs)
                    p = predict_top(model, init.trunk[torch.as_tensor(init.at(test))])[:, 0]
                predictions[(protocol, name, k, seed, t)] = p
                records.append(task_record(protocol, name, "kshot", k, seed, t, y_test, p, k, k))
        exp.timing.setdefault("per_init_s", {})[name] = round(time.perf_counter() - started, 2)
        log(f"[fewshot] {name}: done")
    return pd.DataFrame(records), predictions, subsets


def _kshot_paper_grouped(init: EncodedInit, exp: "Experiment", draws: dict, test: np.ndarray) -> dict:
    """Test predictions of every k-shot ``paper`` run of ``init``, trained ``kshot_group_size`` at a time as grouped
    models (:func:`xcardia.batched.train_kshot_grouped`): each member built and ordered exactly as
    :func:`train_top` would, so the predictions equal the one-at-a-time path's to float tolerance."""
    from xcardia.batched import predict_grouped, train_kshot_grouped

    spec = exp.spec
    jobs = [(key, rows) for key, (rows, _) in draws.items()
            if rows is not None and "paper" in spec.kshot_protocols and key[1] in spec.kshot_paper_ks]
    out: dict = {}
    test_trunk = init.trunk[torch.as_tensor(init.at(test))]
    for k in sorted({key[1] for key, _ in jobs}):
        same_k = [(key, rows) for key, rows in jobs if key[1] == k]
        for start in range(0, len(same_k), spec.kshot_group_size):
            group = same_k[start:start + spec.kshot_group_size]
            members = []
            for (t, _k, seed), _rows in group:
                torch.manual_seed(seed)  # as train_top builds its model
                members.append(TopModel(init.encoder, 1, spec.reinit_feature, spec.train_batchnorm))
            model = train_kshot_grouped(members, init.trunk, [init.at(rows) for _, rows in group],
                                        [exp.labels[rows][:, [t]] for (t, _k, _s), rows in group],
                                        [seed for (_t, _k, seed), _ in group], spec, spec.kshot_epochs)
            probabilities = predict_grouped(model, test_trunk)[:, :, 0]
            for m, (key, _rows) in enumerate(group):
                out[key] = probabilities[:, m]
    return out


def prepare_experiment(profile, manifest, inits: dict[str, str], cache_dir, spec: FinetuneSpec | None = None,
                       seed: int = 0, log=print, allow_unfinished: bool = False) -> Experiment:
    """Load the data once and encode every init (``name → "scratch" | run folder | encoder file``). A run that did
    not finish is refused unless ``allow_unfinished``."""
    spec = spec or FinetuneSpec()
    for source in inits.values():
        refuse_unfinished(str(source), allow_unfinished, lambda *_: None)
    encoders = {name: build_init(str(source), profile.model.image, profile.preprocess, seed, log)  # refuse bad inits first
                for name, source in inits.items()}
    exp = Experiment(manifest, profile.model.image, profile.preprocess, PreprocessCache(cache_dir, profile.preprocess), spec)
    for s in ("train", "val", "test"):
        exp.datasets[s].warm()
    for name, encoder in encoders.items():
        started = time.perf_counter()
        exp.add_init(name, encoder, log)
        exp.timing.setdefault("encode_s", {})[name] = round(time.perf_counter() - started, 2)
        log(f"[finetune] encoded {name}")
    return exp


def save_predictions(path: str | os.PathLike, predictions: dict) -> None:
    arrays = {"|".join(map(str, key)): value for key, value in predictions.items()}
    write_atomic(path, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")


def parse_key(key: str) -> tuple:
    """A predictions key written by :func:`save_predictions` (``"kshot|paper|clip_s0|5|0"``) back as a tuple, its
    numbers as numbers."""
    def parse(part: str):
        for cast in (int, float):
            try:
                return cast(part)
            except ValueError:
                pass
        return part

    return tuple(parse(p) for p in key.split("|"))


def load_predictions(path: str | os.PathLike) -> dict:
    with np.load(path) as data:
        return {parse_key(key): data[key] for key in data.files}
