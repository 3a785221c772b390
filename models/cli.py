"""`stepnet train` and `stepnet evaluate`. Nothing heavy is imported until a command runs."""

from pathlib import Path

DATASET_HELP = "digits (embedded, default) | cifar10 | cifar100 | imagefolder"


def _cmd_train(args) -> int:
    from models.train import TrainConfig, train

    cfg = TrainConfig(out=args.out, dataset=args.dataset, data_dir=args.data_dir, family=args.family,
                      depth=args.depth, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, input_size=args.input_size, workers=args.workers,
                      train_images=args.train_images, force=args.force, progress=not args.quiet)
    config = train(cfg)
    print(f"test accuracy {config['test_accuracy']:.4f}; checkpoint written to {args.out}")
    return 0


def _cmd_evaluate(args) -> int:
    from models import checkpoint, data
    from models.train import evaluate

    config = checkpoint.read_config(args.checkpoint)
    dataset = args.dataset or config.get("dataset", "digits")
    test_set, info = data.load(dataset, "test", args.data_dir,
                               input_size=config.get("data", {}).get("input_size"))
    model, _, _ = checkpoint.load(args.checkpoint, expect_classes=len(info.classes))
    result = evaluate(model, test_set, workers=args.workers)
    print(f"{dataset} test accuracy: {result['accuracy']:.4f} ({result['samples']} images)")
    print(f"{'layer':<16}{'channels':>9}{'step size':>11}{'NSI':>10}")
    for row in result["layers"]:
        nsi = "-" if row["nsi_mean"] is None else f"{row['nsi_mean']:.4f}"
        print(f"{row['name']:<16}{row['channels']:>9}{row['step_size_mean']:>11.4f}{nsi:>10}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a checkpoint folder",
                       description="Train StepNet or a baseline. Writes OUT/model.safetensors, "
                                   "OUT/config.json and OUT/metrics.jsonl (one JSON line per epoch).")
    p.add_argument("--dataset", default="digits", help=DATASET_HELP)
    p.add_argument("--data-dir", type=Path, help="folder with the data set (cifar*, imagefolder)")
    p.add_argument("--family", default="stepnet", help="resnet | se | stepnet (default stepnet)")
    p.add_argument("--depth", type=int, default=20,
                   help="CIFAR style 20, 56, 110 (basic), 164 (bottleneck); ImageNet style 18, 34 "
                        "(basic), 50, 101 (bottleneck); default 20")
    p.add_argument("--epochs", type=int, default=15, help="default 15")
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--input-size", type=int, help="model input size for imagefolder (default 224)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.add_argument("--train-images", type=int,
                   help="train on a fixed random subset of this many images (default: all)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to create")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("evaluate", help="accuracy and per-layer step size and NSI of a checkpoint",
                       description="Evaluate a checkpoint on a test split: top-1 accuracy, then per "
                                   "residual block the mean step size and mean NSI (DESIGN 1.1).")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder written by `stepnet train`")
    p.add_argument("--dataset", help=f"{DATASET_HELP} (default: the one it was trained on)")
    p.add_argument("--data-dir", type=Path, help="folder with the data set (cifar*, imagefolder)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.set_defaults(run=_cmd_evaluate)


