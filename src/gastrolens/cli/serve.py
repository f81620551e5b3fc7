"""``gastrolens serve``: run the daemon in the foreground, in one role (``--role``)."""

from __future__ import annotations

import argparse

from gastrolens import logsetup
from gastrolens.cli.common import add_config_option, settings_from
from gastrolens.config.schema import ServiceRole


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="run the DICOM node in the foreground (logs to stderr)")
    add_config_option(parser)
    parser.add_argument(
        "--role", choices=[r.value for r in ServiceRole], default=None,
        help="all: everything in one process; receiver: DICOM services and API, no model; "
             "worker: inference, study completion, delivery, retention and API, no DICOM port "
             "(default: [daemon] role, else all)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)  # before the heavy imports (torch): a bad config fails in well under a second
    if args.role is not None:
        settings = settings.model_copy(
            update={"daemon": settings.daemon.model_copy(update={"role": ServiceRole(args.role)})})
    logsetup.configure((args.log_level or settings.logging.level).upper(), fmt=settings.logging.format)
    from gastrolens.daemon.service import Service

    return Service(settings).run()
