"""Command-line interface: ``python -m xcardia <command> ...``. Each command calls the same library function a
notebook calls; bad input ends with one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import sys

from xcardia.errors import XcardiaError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line that says what to do."""

    def error(self, message):  # noqa: D401 - argparse hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text: str, low: int, high: int | None, what: str) -> int:
    """``text`` as an integer in [low, high], or argparse's one-line usage error saying what was expected."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, None, "a positive integer")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


#: Seeds are offset per replicate and per k-shot draw (``+ 1000·K``), and scikit-learn accepts 0 ≤ seed < 2³².
MAX_SEED = 2**31 - 1


def _seed(text: str) -> int:
    return _integer(text, 0, MAX_SEED, f"an integer seed in 0..{MAX_SEED} (NumPy and scikit-learn need a "
                                       f"non-negative seed below 2³¹ once replicate offsets are added)")


def _workers(text: str) -> int:
    """≥ 0 processes, capped at this machine's CPU count with a one-line notice (``--workers 999`` would start a
    thousand loader processes and exhaust memory, killing other processes on the machine)."""
    import os

    value = _integer(text, 0, None, "a number of processes (0 or more)")
    cpus = os.cpu_count() or 1
    if value > cpus:
        print(f"notice: --workers {value} is more than this machine's {cpus} CPUs; using {cpus}", file=sys.stderr)
        return cpus
    return value


def _shape(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or X,Y,Z voxels, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"shape {text!r}: give S or X,Y,Z with every side at least 16 voxels")
    if max(parts) > 512:  # refused before anything is allocated (the paper's volumes are 164³)
        raise argparse.ArgumentTypeError(f"shape {text!r}: every side at most 512 voxels")
    return tuple(parts)


def _spacing(text: str) -> float:
    value = _positive_float(text)
    if not 0.2 <= value <= 10.0:  # the plausible CT spacing of xcardia.data.imaging.SPACING_RANGE_MM
        raise argparse.ArgumentTypeError(f"spacing {value:g} mm is outside 0.2–10 mm (CT voxel sizes)")
    return value


def _fractions(text: str) -> tuple[float, float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected four fractions pretrain,train,val,test, got {text!r}")
    return parts


def _profile_names() -> list[str]:
    from xcardia.config import PROFILES

    return list(PROFILES)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m xcardia", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate the synthetic digital-twin cohort")
    g.add_argument("--profile", choices=_profile_names(), help="take unset options from this profile (default: cpu)")
    g.add_argument("--n-patients", type=_positive_int)
    g.add_argument("--shape", type=_shape, help="S or X,Y,Z voxels (each ≥ 16)")
    g.add_argument("--spacing", type=_spacing, help="voxel spacing in mm (0.2–10)")
    g.add_argument("--field-of-view", choices=["heart", "chest"])
    g.add_argument("--seed", type=_seed)
    g.add_argument("--splits", type=_fractions, help="pretrain,train,val,test fractions (sum 1)")
    g.add_argument("--no-labelmap", action="store_true", help="do not write structure label maps")
    g.add_argument("--workers", type=_workers, default=1, help="processes (capped at the CPU count; 0 = 1)")
    g.add_argument("--out", required=True, help="output folder (new, empty, or holding this same cohort)")

    v = sub.add_parser("validate", help="check a manifest and every file it points to (exit 0 clean, 1 otherwise)")
    v.add_argument("manifest", help="manifest.csv or a cohort folder")
    v.add_argument("--deep", action="store_true", help="read every voxel (NaNs, constant or unrescaled volumes)")
    v.add_argument("--aliases", choices=["paper"], help="accept the paper's column names and report the mapping")
    v.add_argument("--report", help="also write the report as JSON to this file")
    v.add_argument("--npy-spacing", type=_positive_float, help="voxel spacing (mm) of .npy volumes")

    t = sub.add_parser("pretrain", help="pretrain a CT encoder (runs under torchrun unchanged)")
    t.add_argument("--method", required=True, choices=["clip", "xcardia", "nw_only"])
    t.add_argument("--data", required=True, help="manifest.csv or cohort folder")
    t.add_argument("--profile", choices=_profile_names(), default="cpu")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--epochs", type=_positive_int)
    t.add_argument("--seed", type=_seed)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--variant", choices=["paper", "fixed"], help="paper: the public code's settings; fixed: corrected")
    t.add_argument("--nw-query", choices=["fused", "image"])
    t.add_argument("--bank", choices=["kmeans", "queue", "batch"])
    t.add_argument("--bank-k-per-concept", type=_positive_int, help="k-means exemplars per concept (paper: 5)")
    t.add_argument("--batch-size", type=_positive_int, help="per process")
    t.add_argument("--workers", type=_workers, help="data loader processes (capped at the CPU count)")
    t.add_argument("--cache", help="preprocessed-CT cache folder (default: next to --out)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bfloat16 autocast (on a CPU only where it has bf16 units; default: the profile's)")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last_3d memory layout (default: the profile's)")
    t.add_argument("--activation-checkpointing", action="store_true", help="GPU: recompute ResNet stages")
    t.add_argument("--compile", action="store_true", help="GPU: torch.compile the model")

    for name, helptext in (("finetune", "fine-tune encoders on the ten tasks (paper protocol, linear probe, "
                                         "scratch end to end) over label fractions"),
                           ("fewshot", "true k-shot evaluation: k positives + k negatives per task, many seeds")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("--init", action="append", required=True, metavar="INIT",
                       help="'scratch', a pretraining run folder or an encoder file; NAME=PATH names it (repeatable)")
        e.add_argument("--data", required=True, help="manifest.csv or cohort folder")
        e.add_argument("--profile", choices=_profile_names(), default="cpu")
        e.add_argument("--out", required=True, help="results folder")
        e.add_argument("--seed", type=_seed, default=0)
        e.add_argument("--allow-unfinished", action="store_true",
                       help="accept a pretraining run that did not finish (its latest encoder; stated in the results)")
        e.add_argument("--cache", help="preprocessed-CT cache folder (default: next to --out)")
        if name == "fewshot":
            e.add_argument("--k", help="comma-separated k values (default: the profile's)")
            e.add_argument("--seeds", type=_positive_int, help="draws per k and task (default: the profile's)")

    x = sub.add_parser("export", help="train an init with the paper protocol on every training label and write it as "
                                      "a shareable screening bundle (MONAI bundle layout, safetensors)")
    x.add_argument("--init", required=True, help="a pretraining run folder, an encoder file or scratch:K")
    x.add_argument("--data", required=True, help="manifest.csv or cohort folder (train, val, test with labels)")
    x.add_argument("--profile", choices=_profile_names(), default="cpu")
    x.add_argument("--out", required=True, help="bundle folder (new, empty, or a bundle to replace)")
    x.add_argument("--name", help="the bundle's name (default: the --init folder's name)")
    x.add_argument("--seed", type=_seed, default=123, help="fine-tuning seed (default 123, the public sweep's first)")
    x.add_argument("--cache", help="preprocessed-CT cache folder (default: next to --out)")

    sc = sub.add_parser("screen", help="apply a screening bundle to a folder of chest CTs or a label-free manifest")
    sc.add_argument("--model", required=True, help="a bundle folder written by `export`")
    sc.add_argument("--data", required=True, help="a manifest (patient_id, ct_path[, heart_mask_path]) or a folder "
                                                  "of NIfTI files / DICOM series folders, one patient each")
    sc.add_argument("--out", required=True, help="output folder (new, empty, or an earlier screening output to resume)")
    sc.add_argument("--workers", type=_workers, default=0, help="loader processes (capped at the CPU count)")
    sc.add_argument("--force", action="store_true", help="screen again patients already written")
    sc.add_argument("--no-report", action="store_true", help="skip the per-patient PNG reports")
    sc.add_argument("--shard", type=_shard, metavar="K/N",
                    help="screen only shard K of N (a scheduler array job); the last shard to finish writes the table")
    sc.add_argument("--merge", action="store_true",
                    help="screen nothing: rebuild predictions.csv and screen.json from the patients' records")

    b = sub.add_parser("bench", help="benchmarks: ratios against baselines measured in the same run")
    b.add_argument("--quick", action="store_true", help="smaller sizes (under 3 minutes on 2 cores)")
    b.add_argument("--scale", choices=["full", "quick", "tiny"], help=argparse.SUPPRESS)
    b.add_argument("--only", help="comma-separated benchmark names")
    b.add_argument("--json", help="also write the results as JSON to this file")

    rs = sub.add_parser("resolution", help="the resolution study (results/resolution/README.md): the cohort gate, "
                                           "the pilot, every unit without a record, the tables — what is done is skipped")
    rs.add_argument("--arm", choices=["32", "48", "64"], help="the arm to run (voxels per side); none: tables only")
    rs.add_argument("--units", help="comma-separated units of the arm (default: all of them)")
    rs.add_argument("--only", help="comma-separated steps: gate, pilot, units, tables (default: all)")
    rs.add_argument("--reference", help="the 32³ arm only: the `reproduce --profile cpu` output folder whose cohort "
                                        "and pretraining runs it evaluates (read-only)")
    rs.add_argument("--work", help="folder for cohorts, runs and caches (default: outputs/resolution)")
    rs.add_argument("--results", help="folder of the committed records and tables (default: results/resolution)")
    rs.add_argument("--commit", action="store_true", help="git-commit each record (and the pilot) as it is written")

    r = sub.add_parser("reproduce", help="run every notebook through papermill")
    r.add_argument("--profile", choices=_profile_names(), default="cpu")
    r.add_argument("--out", help="output folder (default: outputs/<profile>)")
    r.add_argument("--data", help="a manifest.csv or cohort folder to use instead of the synthetic cohort")
    r.add_argument("--seed", type=_seed, default=0)
    r.add_argument("--only", help="comma-separated notebook numbers or names to run (default: all)")
    r.add_argument("--notebooks", help="folder of numbered notebooks (default: the repository's notebooks/)")
    r.add_argument("--cell-timeout", type=int, default=-1,
                   help="seconds one notebook cell may run (0: no limit; default: the profile's — none for cpu/paper)")
    return parser


def _cmd_generate(args) -> int:
    from dataclasses import replace

    from xcardia.cohort.generate import generate_cohort
    from xcardia.config import get_profile

    profile = get_profile(args.profile or "cpu")
    spec = profile.cohort
    render = spec.render
    render = replace(
        render,
        shape=args.shape or render.shape,
        spacing_mm=args.spacing or render.spacing_mm,
        field_of_view=args.field_of_view or render.field_of_view,
    )
    spec = replace(
        spec,
        n_patients=args.n_patients or spec.n_patients,
        seed=spec.seed if args.seed is None else args.seed,
        render=render,
        split_fractions=args.splits or spec.split_fractions,
        write_labelmap=not args.no_labelmap,
    )
    from pathlib import Path

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise XcardiaError(f"--out {args.out} is an existing file; give a folder for the cohort (nothing was written)")
    manifest = generate_cohort(args.out, spec, workers=max(1, args.workers))
    print(f"cohort of {spec.n_patients} patients: {manifest}")
    return 0


def _cmd_validate(args) -> int:
    from xcardia.data.validate import validate_manifest, write_report

    from pathlib import Path

    from xcardia.data.manifest import load_manifest, manifest_file
    from xcardia.run_folder import refuse_input_paths

    if args.report:  # checked before any work: never overwrite an input, never fail after a long --deep run
        report_path = Path(args.report)
        if not report_path.parent.exists():
            raise XcardiaError(f"--report {args.report}: the folder {report_path.parent} does not exist; create it first")
        if report_path.is_dir():
            raise XcardiaError(f"--report {args.report} is a folder; give a file name such as validation.json")
        if report_path.resolve() == manifest_file(args.manifest).resolve():
            raise XcardiaError(f"--report {args.report} is the manifest itself; write the report elsewhere "
                               f"(nothing was written)")
        try:
            refuse_input_paths(report_path, load_manifest(args.manifest, check=False), "--report")
        except XcardiaError as exc:
            if "is the manifest" in str(exc) or "image" in str(exc):
                raise
    report = validate_manifest(args.manifest, deep=args.deep, aliases=args.aliases, npy_spacing_mm=args.npy_spacing)
    print(report.to_text())
    if args.report:
        write_report(report, args.report)
    return 0 if report.ok else 1


def _cmd_pretrain(args) -> int:
    from xcardia.config import get_profile
    from xcardia.distributed import shutdown
    from xcardia.pretrain import pretrain, profile_run_specs

    profile = get_profile(args.profile)
    overrides = {"epochs": args.epochs, "seed": args.seed, "variant": args.variant, "nw_query": args.nw_query,
                 "bank": args.bank, "bank_k_per_concept": args.bank_k_per_concept, "batch_size": args.batch_size,
                 "num_workers": args.workers,
                 "bf16": args.bf16, "channels_last": args.channels_last}
    if args.activation_checkpointing:
        overrides["activation_checkpointing"] = True
    if args.compile:
        overrides["compile"] = True
    model_spec, spec = profile_run_specs(profile, args.method, **overrides)
    from xcardia.run_folder import RunFolder

    _refuse_output_in_inputs(args.out, args.data, args.cache, RunFolder.MARKERS, "pretraining run")
    try:
        pretrain(args.data, args.out, model_spec, spec, profile.preprocess, cache_dir=args.cache, resume=args.resume)
    finally:
        shutdown()  # under torchrun: leave the process group cleanly
    return 0


def _refuse_output_in_inputs(out, data, cache=None, markers: tuple[str, ...] | None = None, kind: str = "") -> None:
    """``--out`` (and ``--cache``) never inside the cohort's inputs; ``--out`` new, empty or of its own kind."""
    from xcardia.data.manifest import load_manifest
    from xcardia.run_folder import refuse_foreign_folder, refuse_input_paths

    manifest = load_manifest(data, check=False)
    refuse_input_paths(out, manifest, "--out")
    if cache:
        refuse_input_paths(cache, manifest, "--cache")
    if markers:
        refuse_foreign_folder(out, markers, "--out", kind)


def _parse_inits(values: list[str]) -> dict[str, str]:
    from pathlib import Path

    inits = {}
    for value in values:
        # NAME=PATH names an init, unless the whole value is an existing path (paths may contain '=')
        named = "=" in value and not Path(value).exists()
        name, _, path = value.partition("=") if named else ("", "", value)
        if not (path == "scratch" or path.startswith("scratch:")) and not Path(path).exists():
            raise XcardiaError(f"--init {value}: {path} does not exist; pass 'scratch', a pretraining run folder or "
                               f"an encoder file")
        name = name or ("scratch" if path == "scratch" else Path(path).stem if Path(path).is_file() else Path(path).name)
        if name in inits:
            raise XcardiaError(f"--init {value}: the name {name!r} is used twice; name them with NAME=PATH")
        inits[name] = path
    return inits


def _cmd_evaluate(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from xcardia import reporting
    from xcardia.config import get_profile
    from xcardia.finetune import fewshot_experiment, finetune_experiment
    from xcardia.results import update_metrics, write_summary

    profile = get_profile(args.profile)
    inits = _parse_inits(args.init)
    spec = profile.finetune
    out = Path(args.out)
    _refuse_output_in_inputs(out, args.data, args.cache,
                             ("config.json", "records.csv", "kshot_records.csv", "test_labels.npy"), "evaluation output")
    if args.command == "finetune":
        records, predictions, y_test = finetune_experiment(profile, args.data, inits, out, args.cache, spec, args.seed,
                                                           progress=True, allow_unfinished=args.allow_unfinished)
        section = reporting.finetune_section(records, predictions, y_test, spec.n_boot, args.seed)
        update_metrics(out, "finetune", section)
        update_metrics(out, "claims", reporting.claims_from_sections(section, None))
    else:
        if args.k:
            try:
                ks = tuple(int(k) for k in args.k.split(","))
            except ValueError:
                raise XcardiaError(f"--k {args.k!r}: give comma-separated positive integers, e.g. 1,5,10,25") from None
            if min(ks) < 1:
                raise XcardiaError(f"--k {args.k!r}: every k must be at least 1")
            spec = replace(spec, ks=ks, kshot_paper_ks=tuple(k for k in ks if k in spec.kshot_paper_ks) or ks)
        if args.seeds:
            spec = replace(spec, kshot_seeds=args.seeds)
        records, _, _ = fewshot_experiment(profile, args.data, inits, out, args.cache, spec, args.seed, progress=True,
                                           allow_unfinished=args.allow_unfinished)
        section = reporting.fewshot_section(records, k_table=5 if 5 in spec.ks else spec.ks[0])
        update_metrics(out, "fewshot", section)
        update_metrics(out, "claims", reporting.claims_from_sections(None, section))
    summary = write_summary(out)
    print(f"results: {out / 'metrics.json'}, {summary}")
    return 0


def _cmd_bench(args) -> int:
    from xcardia.paths import project_root

    if not (project_root() / "bench" / "suite.py").exists():
        raise XcardiaError("the benchmark suite lives in the repository's bench/ folder; run from a checkout")
    import runpy

    suite = runpy.run_path(str(project_root() / "bench" / "suite.py"), run_name="xcardia_bench_suite")
    BENCHMARKS, format_table, run = suite["BENCHMARKS"], suite["format_table"], suite["run"]  # noqa: N806

    only = args.only.split(",") if args.only else None
    if only and set(only) - set(BENCHMARKS):
        raise XcardiaError(f"--only: unknown benchmark(s) {sorted(set(only) - set(BENCHMARKS))}; "
                           f"choose from {', '.join(BENCHMARKS)}")
    results = run(args.scale or ("quick" if args.quick else "full"), only)
    print(format_table(results))
    if args.json:
        from xcardia.atomic import write_json_atomic

        write_json_atomic(args.json, results)
    return 0


def _cmd_reproduce(args) -> int:
    from xcardia.reproduce import reproduce

    only = args.only.split(",") if args.only else None
    timeout = None if args.cell_timeout == 0 else args.cell_timeout
    reproduce(profile=args.profile, out=args.out, data=args.data, seed=args.seed, only=only, notebooks=args.notebooks,
              cell_timeout_s=timeout)
    return 0


def _cmd_resolution(args) -> int:
    from xcardia.resolution import run_study

    steps = ("gate", "pilot", "units", "tables")
    only = tuple(s.strip() for s in args.only.split(",")) if args.only else steps
    if set(only) - set(steps):
        raise XcardiaError(f"--only: unknown step(s) {sorted(set(only) - set(steps))}; choose from {', '.join(steps)}")
    if args.units and not args.arm:
        raise XcardiaError("--units needs --arm (the units of which arm?)")
    run_study(args.arm, args.units.split(",") if args.units else None, args.work, args.results, args.reference, only,
              args.commit)
    return 0


def _cmd_export(args) -> int:
    from pathlib import Path

    from xcardia.bundle import export_bundle
    from xcardia.config import get_profile

    _refuse_output_in_inputs(args.out, args.data, args.cache)
    name = args.name or Path(args.init.rstrip("/")).name.replace(":", "_")
    export_bundle(args.out, get_profile(args.profile), args.data, args.init, name, args.cache, args.seed)
    return 0


def _shard(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise argparse.ArgumentTypeError(f"{text!r}: write K/N with 1 ≤ K ≤ N, e.g. 3/10 (Slurm: "
                                         f"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(k), int(n)


def _cmd_screen(args) -> int:
    from xcardia.screening import screen

    screen(args.model, args.data, args.out, workers=args.workers, force=args.force, reports=not args.no_report,
           shard=args.shard, merge_only=args.merge)
    return 0


COMMANDS = {
    "generate": _cmd_generate,
    "export": _cmd_export,
    "screen": _cmd_screen,
    "validate": _cmd_validate,
    "pretrain": _cmd_pretrain,
    "resolution": _cmd_resolution,
    "finetune": _cmd_evaluate,
    "fewshot": _cmd_evaluate,
    "bench": _cmd_bench,
    "reproduce": _cmd_reproduce,
}


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that the run ends with one line (and its lock released)."""


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    resumable = args.command == "pretrain"
    hint = ("--resume continues the run from its last complete epoch" if resumable else
            "rerun the same command (finished work is reused)")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except XcardiaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied, a vanished file: the system's words, on one line
        where = f" ({exc.filename})" if exc.filename else ""
        fix = {28: "free some space", 13: "fix the permissions", 30: "write to a writable folder"}.get(
            exc.errno, "fix the cause")
        print(f"error: {exc.strerror or exc}{where}; {fix}, then {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl+C); {hint}", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"terminated (SIGTERM); {hint}", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
