"""The pretraining engine: the real entry point end to end, exact resume, crash safety, bad input, and DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from ddp_workers import run_distributed, tiny_pretrain_specs
from xcardia.cli import main
from xcardia.errors import XcardiaError
from xcardia.models.weights import load_encoder
from xcardia.pretrain import PretrainSpec, pretrain, read_log

QUIET = dict(progress=False, log=lambda *_: None)


def test_cli_pretrain_runs_one_epoch_end_to_end(tiny_cohort, tmp_path):
    code = main(["pretrain", "--method", "xcardia", "--data", str(tiny_cohort), "--profile", "smoke",
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8"])
    assert code == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "complete" and info["selection"]["epoch"] == 1
    encoder, meta = load_encoder(tmp_path / "run")
    assert meta["method"] == "xcardia" and meta["selection"] == "best validation concept mAP"
    log = read_log(tmp_path / "run")
    assert {"train_clip", "train_nw", "nw_temperature", "val_concept_auroc", "val_concept_ece"} <= set(log.columns)


@pytest.mark.parametrize("bank", ["kmeans", "queue"])
def test_resume_gives_the_same_weights_as_training_straight_through(tiny_cohort, tmp_path, bank):
    model, spec, pre = tiny_pretrain_specs("xcardia", epochs=2, bank=bank)
    straight = pretrain(tiny_cohort, tmp_path / "a", model, spec, pre, cache_dir=tmp_path / "cache", **QUIET)
    one = PretrainSpec(**{**spec.__dict__, "epochs": 1})
    pretrain(tiny_cohort, tmp_path / "b", model, one, pre, cache_dir=tmp_path / "cache", **QUIET)
    resumed = pretrain(tiny_cohort, tmp_path / "b", model, spec, pre, cache_dir=tmp_path / "cache", resume=True, **QUIET)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert read_log(straight)["train_loss"].tolist() == read_log(resumed)["train_loss"].tolist()


def test_killed_mid_epoch_leaves_a_readable_resumable_checkpoint(tiny_cohort, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from ddp_workers import tiny_pretrain_specs
        from xcardia.pretrain import pretrain
        model, spec, pre = tiny_pretrain_specs("xcardia", epochs=3)
        def die(epoch, step):
            if epoch == 1 and step == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        pretrain({str(tiny_cohort)!r}, {str(tmp_path / 'run')!r}, model, spec, pre, cache_dir={str(tmp_path / 'cache')!r},
                 progress=False, on_step=die)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "running"
    model, spec, pre = tiny_pretrain_specs("xcardia", epochs=3)
    pretrain(tiny_cohort, tmp_path / "run", model, spec, pre, cache_dir=tmp_path / "cache", resume=True, **QUIET)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"


def test_resume_without_a_checkpoint_is_refused(tiny_cohort, tmp_path):
    model, spec, pre = tiny_pretrain_specs()
    with pytest.raises(XcardiaError, match="does not exist; start without --resume"):
        pretrain(tiny_cohort, tmp_path / "run", model, spec, pre, resume=True, **QUIET)


def test_resume_with_a_different_configuration_is_refused_and_nothing_is_overwritten(tiny_cohort, tmp_path):
    model, spec, pre = tiny_pretrain_specs()
    run = pretrain(tiny_cohort, tmp_path / "run", model, spec, pre, cache_dir=tmp_path / "cache", **QUIET)
    before = (run / "checkpoint.pt").read_bytes()
    other = PretrainSpec(**{**spec.__dict__, "lr": 0.5})
    with pytest.raises(XcardiaError, match=r"different configuration \(pretrain\.lr: 0\.001 → 0\.5\)"):
        pretrain(tiny_cohort, run, model, other, pre, resume=True, **QUIET)
    with pytest.raises(XcardiaError, match="already holds a pretraining run"):
        pretrain(tiny_cohort, run, model, spec, pre, **QUIET)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_unreadable_ct_is_an_error_naming_the_file_before_any_training(tiny_cohort, tmp_path):
    shutil.copytree(tiny_cohort, tmp_path / "cohort")
    (tmp_path / "cohort" / "ct" / "SYN000003.nii.gz").write_bytes(b"corrupt")
    model, spec, pre = tiny_pretrain_specs()
    with pytest.raises(XcardiaError, match=r"SYN000003\.nii\.gz: cannot read"):
        pretrain(tmp_path / "cohort", tmp_path / "run", model, spec, pre, cache_dir=tmp_path / "cache", **QUIET)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_manifest_missing_a_required_column_is_refused(tiny_cohort, tmp_path):
    df = pd.read_csv(tiny_cohort / "manifest.csv").drop(columns=["split"])
    df.to_csv(tmp_path / "manifest.csv", index=False)
    model, spec, pre = tiny_pretrain_specs()
    with pytest.raises(XcardiaError, match="required column"):
        pretrain(tmp_path / "manifest.csv", tmp_path / "run", model, spec, pre, **QUIET)


def test_method_typo_is_refused(capsys):
    with pytest.raises(XcardiaError, match="unknown method 'xcardai'"):
        PretrainSpec(method="xcardai")
    with pytest.raises(SystemExit):
        main(["pretrain", "--method", "xcardai", "--data", "x", "--out", "y"])
    assert "invalid choice: 'xcardai'" in capsys.readouterr().err


def test_two_ranks_match_one_process_on_the_same_global_batch(tiny_cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("XCARDIA_TEST_DATA", str(tiny_cohort))
    monkeypatch.setenv("XCARDIA_TEST_OUT", str(tmp_path / "ddp"))
    ranks = run_distributed("pretrain", 2, tmp_path, timeout_s=300)
    model, spec, pre = tiny_pretrain_specs("clip", batch_size=8)
    single = pretrain(tiny_cohort, tmp_path / "single", model, spec, pre, cache_dir=tmp_path / "cache", **QUIET)
    reference = torch.load(single / "checkpoint.pt", weights_only=True)
    # A conv bias right before a normalisation, and attention's in-projection bias (its key part), have a gradient
    # of exactly zero in theory; AdamW turns their float noise into visible steps, so they are not compared.
    null_gradient = ("downsample.0.bias", "in_proj_bias")
    for key, value in reference["model"].items():
        if not key.endswith(null_gradient):
            torch.testing.assert_close(ranks[0]["model"][key], value, atol=2e-5, rtol=1e-4, msg=key)
    # and what the model computes — the support-bank embeddings after training — agrees for the patients both banks
    # hold (k-means picks can differ where two patients are nearly tied, from float noise in the last digits)
    a, b = ranks[0]["bank"], reference["bank"]
    common = sorted(set(a["indices"].tolist()) & set(b["indices"].tolist()))
    assert len(common) >= 0.75 * min(len(a["indices"]), len(b["indices"]))
    pick = lambda bank: torch.stack([bank["embeddings"][bank["indices"].tolist().index(r)] for r in common])  # noqa: E731
    torch.testing.assert_close(pick(a), pick(b), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("bank", ["kmeans", "queue"])
def test_saved_selection_reproduces_the_logged_validation_score_of_its_epoch(tiny_cohort, tmp_path, bank):
    """Issue 11.5: the selected epoch is saved whole (image encoder, tabular tower, projections, τ, bank), so the
    fused validation concept mAP recomputed from it equals the one logged at that epoch — no hybrid of epochs."""
    import numpy as np

    from xcardia.data.dataset import CohortDataset
    from xcardia.data.imaging import PreprocessCache
    from xcardia.data.manifest import load_manifest
    from xcardia.embeddings import load_run_model, run_bank
    from xcardia.losses import nw_predict
    from xcardia.metrics import concept_metrics
    from xcardia.models.xcardia_model import XCardiaModel

    model_spec, spec, pre = tiny_pretrain_specs("xcardia", epochs=3, bank=bank)
    run = pretrain(tiny_cohort, tmp_path / "run", model_spec, spec, pre, cache_dir=tmp_path / "cache", **QUIET)
    info = json.loads((run / "run.json").read_text())
    epoch = info["selection"]["epoch"]
    logged = read_log(run).set_index("epoch").loc[epoch]

    model, tabular, config = load_run_model(run, "selected")
    bank_state = run_bank(run, "selected")
    manifest = load_manifest(tiny_cohort)
    rows = np.flatnonzero((manifest["split"] == "val").to_numpy())
    ds = CohortDataset(manifest, rows, PreprocessCache(tmp_path / "cache", pre), tabular.transform(manifest), None, 0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
    with torch.no_grad():
        e_img, e_tab = model(batch["image"], batch["tab_values"], batch["tab_missing"])
        query = XCardiaModel.nw_query(e_img, e_tab, config["pretrain"]["nw_query"])
        prediction, _ = nw_predict(query, bank_state.embeddings, bank_state.targets, model.nw_temperature())
    recomputed = concept_metrics(prediction.numpy(), batch["concepts"].numpy())
    assert recomputed["concept_map"] == pytest.approx(logged["val_concept_map"], abs=1e-6)
    assert recomputed["concept_auroc"] == pytest.approx(logged["val_concept_auroc"], abs=1e-6)
    assert "val_image_query_concept_auroc" in logged.index
    assert (run / "encoder_last.pt").exists()


def test_the_run_folder_knows_every_file_the_engine_writes(tiny_cohort, tmp_path):
    """Issue 14: one object names a run's files; the engine writes nothing it does not know, and a queue run's
    bank read back through it holds only filled slots (a row −1 would index the last patient)."""
    from xcardia.run_folder import LOCK_NAME, RunFolder

    model_spec, spec, pre = tiny_pretrain_specs("xcardia", epochs=1, bank="queue")
    folder = RunFolder(pretrain(tiny_cohort, tmp_path / "run", model_spec, spec, pre, cache_dir=tmp_path / "cache",
                                **QUIET))
    known = {folder.CHECKPOINT, folder.SELECTED, folder.ENCODER, folder.ENCODER_LAST, folder.RUN_JSON,
             folder.LOG_JSON, folder.LOG_CSV, LOCK_NAME}
    assert {p.name for p in folder.path.iterdir()} == known
    assert folder.holds_a_run() and folder.info()["status"] == "complete"
    assert folder.log()["epoch"].tolist() == [1]
    for which in ("selected", "last"):
        bank = folder.bank(which)
        assert len(bank) > 0 and bool((bank.indices >= 0).all())
    with pytest.raises(XcardiaError, match="holds no selected.pt"):
        RunFolder(tmp_path / "empty").state_file("selected")


def test_two_processes_cannot_write_one_run_folder(tiny_cohort, tmp_path):
    """Issue 12: the second pretraining into the same --out fails at once, naming the owner; the first is intact."""
    from xcardia.run_folder import RunLock

    with RunLock(tmp_path / "run", "pretraining run"):
        with pytest.raises(XcardiaError, match="in use by a pretraining run"):
            model_spec, spec, pre = tiny_pretrain_specs("clip")
            pretrain(tiny_cohort, tmp_path / "run", model_spec, spec, pre, cache_dir=tmp_path / "cache", **QUIET)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    with RunLock(tmp_path / "eval", "finetune evaluation"):  # the refusal names the holder's kind, not its own
        with pytest.raises(XcardiaError, match=r"in use by a finetune evaluation \(process \d+\)"):
            RunLock(tmp_path / "eval", "pretraining run").acquire()


def test_a_full_disk_after_the_checkpoint_leaves_no_file_ahead_of_it_and_resume_makes_them_agree(
        tiny_cohort, tmp_path, monkeypatch, capsys):
    """Issue 22: the checkpoint is written first; a write failing after it (disk full) is one error line, and
    --resume rewrites the logs, the last encoder and run.json from the checkpoint (here: the final epoch)."""
    import errno

    from xcardia.run_folder import RunFolder

    out = tmp_path / "run"
    real = RunFolder.write_logs
    calls = {"n": 0}

    def full_disk(self, history):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "log.csv"))
        return real(self, history)

    monkeypatch.setattr(RunFolder, "write_logs", full_disk)
    args = ["pretrain", "--method", "clip", "--data", str(tiny_cohort), "--profile", "smoke", "--out", str(out),
            "--epochs", "2", "--batch-size", "8"]
    assert main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    folder = RunFolder(out)
    assert torch.load(folder.checkpoint, weights_only=False)["epoch"] == 2
    assert len(folder.log()) == 1 and folder.info()["status"] == "running"  # behind, never ahead
    monkeypatch.setattr(RunFolder, "write_logs", real)
    assert main([*args, "--resume"]) == 0
    assert len(folder.log()) == 2 and folder.info()["status"] == "complete"
    assert torch.load(folder.encoder_last, weights_only=True)["metadata"]["epoch"] == 2


def test_sigterm_ends_a_run_with_one_line_saying_how_to_continue(tiny_cohort, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from xcardia import pretrain as p
        real = p.train_one_epoch
        def terminated_during_the_first_epoch(run, epoch, progress, on_step=None):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(run, epoch, progress, on_step)
        p.train_one_epoch = terminated_during_the_first_epoch
        from xcardia.cli import main
        sys.exit(main(["pretrain", "--method", "clip", "--data", {str(tiny_cohort)!r}, "--profile", "smoke",
                       "--out", {str(tmp_path / 'run')!r}, "--epochs", "1", "--batch-size", "8"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr[-2000:]
    assert "terminated (SIGTERM); --resume continues" in result.stderr and "Traceback" not in result.stderr


def test_a_diverging_loss_stops_with_one_message_and_leaves_the_last_checkpoint_untouched(tiny_cohort, tmp_path,
                                                                                          monkeypatch):
    """A NaN loss (here planted in epoch 2) stops training before the optimiser writes it into the weights, with a
    message naming the epoch, the step and the precision — not a traceback from k-means three calls later."""
    import xcardia.pretrain as engine

    model, spec, pre = tiny_pretrain_specs("xcardia", epochs=3)
    real = engine.pretraining_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] > steps_per_epoch else (loss, parts)

    one = pretrain(tiny_cohort, tmp_path / "probe", model, PretrainSpec(**{**spec.__dict__, "epochs": 1}), pre,
                   cache_dir=tmp_path / "cache", **QUIET)
    steps_per_epoch = int(read_log(one)["step"].iloc[-1])
    monkeypatch.setattr(engine, "pretraining_loss", poisoned)
    with pytest.raises(XcardiaError, match=r"training loss is nan at epoch 2, step 1 \(fp32\).*untouched"):
        pretrain(tiny_cohort, tmp_path / "run", model, spec, pre, cache_dir=tmp_path / "cache", **QUIET)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
