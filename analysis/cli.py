"""`stepnet analyze`: the stiffness analysis report (analysis/study.py), or with --study ood how
well the per-request stiffness score detects out-of-distribution inputs (analysis/ood.py).
Imports nothing heavy."""

import shlex
import sys
from pathlib import Path

from analysis.defaults import DEFAULT_DEPTH, DEFAULT_EPOCHS, DEFAULT_SEEDS, DEFAULT_SPARSE_K, OOD_SEEDS
from models.cli import DATA_DIR_HELP, DATASET_HELP
from stepnet.errors import UserError


def parse_sparse_k(text: str) -> tuple[int, ...]:
    """'1,3' -> (1, 3); 'none' -> ()."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--sparse-k takes block counts separated by commas, like 1,3, or none; "
                        f"got {text!r}") from None


def _cmd_analyze(args) -> int:
    from analysis.report import chance_warning
    from analysis.study import AnalysisConfig, analyze

    if args.study == "ood":
        sparse_k = () if args.sparse_k is None else parse_sparse_k(args.sparse_k)
    else:
        sparse_k = DEFAULT_SPARSE_K if args.sparse_k is None else parse_sparse_k(args.sparse_k)
    cfg = AnalysisConfig(out=args.out, dataset=args.dataset, data_dir=args.data_dir, depth=args.depth,
                         seeds=args.seeds, epochs=args.epochs, sparse_k=sparse_k,
                         checkpoints=tuple(args.checkpoints), checkpoint_dir=args.checkpoint_dir,
                         train_images=args.train_images, batch_size=args.batch_size, lr=args.lr,
                         jobs=args.jobs, adaptor_bias=args.adaptor_init_bias, force=args.force)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    if args.study == "ood":
        return _ood(cfg, log, shlex.join(["stepnet", *getattr(args, "argv", ["analyze"])]))
    results = analyze(cfg, log)
    fam = results["families"]
    print("  ".join(f"{f} {100 * s['accuracy_mean']:.2f}%" for f, s in fam.items()))
    print(f"report written to {args.out / 'report.md'} ({results['seconds'] / 60:.1f} minutes)")
    if warning := chance_warning(results):      # also with --quiet: it is about the results
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _ood(cfg, log, command: str) -> int:
    from analysis.ood import run

    results = run(cfg, log, command)
    print("  ".join(f"{row['name']} {100 * row['accuracy']:.2f}%" for row in results["runs"]))
    print(f"report written to {cfg.out / 'report.md'} ({results['seconds'] / 60:.1f} minutes)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "analyze", help="compare resnet, se and stepnet: accuracy, NSI profiles, step size vs NSI",
        description="Train (or take checkpoints of) resnet, se and stepnet at one depth over several "
                    "seeds and write OUT/report.md with PNG figures and OUT/results.json: accuracy, "
                    "parameters and FLOPs; per-block NSI profiles; step size against NSI; stage "
                    "stiffness ratios; StepNet with adaptors only at the k stiffest blocks. With "
                    "--study ood, one model per family instead, and how well the per-request "
                    "stiffness score tells other data, synthetic and corrupted images from the test "
                    "images, against the maximum softmax probability and energy.")
    p.add_argument("--study", choices=("stiffness", "ood"), default="stiffness",
                   help="stiffness: the stiffness analysis (default); ood: the stiffness score as an "
                        "out-of-distribution detector (digits and fashion-mnist)")
    p.add_argument("--dataset", help=f"{DATASET_HELP} (default digits, or that of --checkpoints)")
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    p.add_argument("--depth", type=int, help=f"network depth (default {DEFAULT_DEPTH})")
    p.add_argument("--seeds", type=int, help=f"train seeds 0..N-1 (default {DEFAULT_SEEDS}; "
                                             f"{OOD_SEEDS} with --study ood)")
    p.add_argument("--epochs", type=int, help=f"epochs per model (default {DEFAULT_EPOCHS})")
    sparse_k = ",".join(map(str, DEFAULT_SPARSE_K))
    p.add_argument("--sparse-k",
                   help="numbers of stiffest blocks that get an adaptor in the sparse comparison, "
                        f"comma-separated, or none (default {sparse_k}; not with --study ood)")
    p.add_argument("--checkpoints", type=Path, nargs="+", default=[], metavar="CHECKPOINT",
                   help="checkpoint folders of resnet, se and stepnet (same seeds, one recipe) to "
                        "analyze instead of training them; sparse runs missing from them are "
                        "trained with their recipe")
    p.add_argument("--checkpoint-dir", type=Path,
                   help="where the trained checkpoints go (default OUT/checkpoints)")
    p.add_argument("--train-images", type=int,
                   help="train on a fixed random subset of this many images (quick trials); --study "
                        "ood calibrates on training images outside it (default there: 20 %% of the "
                        "training split, at most 2000, held out)")
    p.add_argument("--adaptor-init-bias", type=float, metavar="BIAS",
                   help="also train se and stepnet with their adaptors' last bias at BIAS, so that h "
                        "starts near sigmoid(BIAS) (3: about 0.95, a plain network's steps of 1), and "
                        "compare them (default: not)")
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    p.add_argument("--jobs", type=int,
                   help="models trained at once, each in its own process with an equal share of the "
                        "cores (default: one per CPU core)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, figures, results.json")
    p.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=_cmd_analyze)
