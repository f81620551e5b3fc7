"""``gastrolens models info PATH``: print a model package's card after verifying it."""

from __future__ import annotations

import argparse
import sys

from gastrolens.errors import ModelPackageError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="model packages")
    commands = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    info = commands.add_parser("info", help="verify a model package and print its card (JSON)")
    info.add_argument("path", help="model package folder (model.json + weights.safetensors)")
    info.add_argument(
        "--no-verify",
        action="store_true",
        help="only read and check the card; skip the weights hash and architecture checks",
    )
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    # Imported here: torch is heavy and only this command needs it.
    from gastrolens.models.package import load_package, read_card

    try:
        card = read_card(args.path) if args.no_verify else load_package(args.path).card
    except ModelPackageError as exc:
        print(f"gastrolens: error: bad model package: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(card.to_json())
    if args.no_verify:
        print(f"{args.path}: card read; weights not verified", file=sys.stderr)
    else:
        state = "UNTRAINED: " + ", ".join(card.untrained_networks) if card.untrained_networks else "trained"
        print(f"{args.path}: verified (weights sha256 {card.weights_sha256}; {state})", file=sys.stderr)
    return 0
