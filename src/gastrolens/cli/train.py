"""``gastrolens train classifier|segmenter``: train one network into a model package.

``gastrolens train synthetic-data`` writes a small synthetic data set (images, masks,
manifest.csv) to try the commands on. Recipe defaults live in
:class:`gastrolens.training.recipe.Recipe` only; options left out keep them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from gastrolens.errors import ConfigError


def _default(name: str) -> object:
    from gastrolens.training.recipe import Recipe

    field = Recipe.__dataclass_fields__[name]
    return field.default


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train the classifier or the segmenter on a manifest into a model package")
    tasks = parser.add_subparsers(dest="train_task", required=True, metavar="NETWORK")
    for task, what in (
        ("classifier", "the 5-class ResNet-34"),
        ("segmenter", "the DeepLabv3-ResNet-34 lesion segmenter"),
    ):
        p = tasks.add_parser(task, help=f"train {what}")
        _add_training_options(p)
        p.set_defaults(func=run_train, task=task)
    synthetic = tasks.add_parser(
        "synthetic-data",
        help="write a synthetic data set (PNG images, masks, manifest.csv) to try training on",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    synthetic.add_argument("--out", required=True, help="folder to write into")
    synthetic.add_argument("--lesions-per-class", type=int, default=10)
    synthetic.add_argument("--images-per-lesion", type=int, default=2)
    synthetic.add_argument("--rows", type=int, default=96)
    synthetic.add_argument("--cols", type=int, default=112)
    synthetic.add_argument("--test-fraction", type=float, default=0.3, help="patients marked split=test")
    synthetic.add_argument("--dicom-every", type=int, default=0, help="write every k-th image as DICOM (0: none)")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.set_defaults(func=run_synthetic)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="data set manifest (CSV; see README)")
    p.add_argument("--out", required=True, help="model package folder; the other network already there is kept")
    recipe = p.add_argument_group("recipe (defaults: the study's where it gives them, see gastrolens.training.recipe)")
    recipe.add_argument("--epochs", type=int, default=None, help=f"default {_default('epochs')}")
    recipe.add_argument("--batch-size", type=int, default=None, help=f"default {_default('batch_size')} (study)")
    recipe.add_argument(
        "--lr",
        type=float,
        default=None,
        dest="learning_rate",
        help=f"initial learning rate, default {_default('learning_rate')} (study)",
    )
    recipe.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="default sgd (study)")
    recipe.add_argument("--momentum", type=float, default=None, help=f"SGD momentum, default {_default('momentum')}")
    recipe.add_argument("--weight-decay", type=float, default=None, help=f"default {_default('weight_decay')}")
    recipe.add_argument("--schedule", choices=("cosine", "step", "constant"), default=None, help="default cosine")
    recipe.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="network input size in px (default: the study's 512 / 513); small values make quick checks",
    )
    recipe.add_argument("--output-stride", type=int, choices=(8, 16), default=None, help="segmenter only; default 16")
    recipe.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"share of patients (without a split) held out for validation, default {_default('val_fraction')}",
    )
    recipe.add_argument("--seed", type=int, default=None, help="a fixed seed reproduces a run (default 0)")
    recipe.add_argument(
        "--imagenet",
        default=None,
        metavar="FILE",
        help="initialise from torchvision's resnet34 ImageNet state dict (a local file; nothing is downloaded)",
    )
    recipe.add_argument("--no-augment", action="store_true", help="switch the study's augmentations off")
    recipe.add_argument("--no-amp", action="store_true", help="full precision on CUDA too")
    recipe.add_argument(
        "--precise-bn-batches",
        type=int,
        default=None,
        help=f"batches for re-estimating BatchNorm statistics before validation (0: off), "
        f"default {_default('precise_bn_batches')}",
    )
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run.add_argument(
        "--workers", type=int, default=None,
        help="data loader worker processes (default: one per core but one, at most 16; 0: in the main process)"
    )
    run.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this network")
    run.add_argument("--checkpoint-dir", default=None, help="where per-epoch checkpoints go (default: OUT/checkpoints)")
    run.add_argument("--name", default=None, help="package name (default: kept from OUT, else gastrolens-site)")
    run.add_argument(
        "--version",
        dest="package_version",
        default=None,
        help="package version (default: the UTC time, YYYYMMDD.HHMMSS)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def recipe_from_args(args: argparse.Namespace):
    from gastrolens.training.recipe import Recipe

    names = [f.name for f in dataclasses.fields(Recipe)]
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    given["task"] = args.task
    if args.no_augment:
        given["augment"] = False
    if args.no_amp:
        given["amp"] = False
    try:
        return Recipe(**given)
    except ValueError as exc:
        raise ConfigError("gastrolens train", "options", str(exc)) from exc


def run_train(args: argparse.Namespace) -> int:
    import torch

    from gastrolens.training.manifest import read_manifest
    from gastrolens.training.trainer import train

    recipe = recipe_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = read_manifest(args.manifest)
    result = train(
        recipe,
        manifest,
        args.out,
        device=args.device,
        workers=args.workers,
        resume=args.resume,
        checkpoint_dir=args.checkpoint_dir,
        progress=not args.no_progress and sys.stderr.isatty(),
        name=args.name,
        version=args.package_version,
    )
    card = result.package.card
    last = result.history[-1] if result.history else {}
    figures = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith("val_") and isinstance(v, float))
    print(f"{args.out}: {card.name} {card.version} (weights sha256 {card.weights_sha256})")
    print(f"{recipe.task}: {len(result.history)} epochs; last validation: {figures or 'none'}")
    if card.untrained_networks:
        print(f"UNTRAINED: {', '.join(card.untrained_networks)} (outputs resting on it say so)")
    return 0


def run_synthetic(args: argparse.Namespace) -> int:
    from gastrolens.training.synthetic import write_dataset

    manifest = write_dataset(
        args.out,
        lesions_per_class=args.lesions_per_class,
        images_per_lesion=args.images_per_lesion,
        rows=args.rows,
        cols=args.cols,
        test_fraction=args.test_fraction,
        dicom_every=args.dicom_every,
        seed=args.seed,
    )
    print(manifest)
    return 0
