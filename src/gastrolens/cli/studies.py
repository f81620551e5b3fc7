"""``gastrolens studies complete UID``: report a study now, for a sender that sends neither MPPS nor a pause.

The command records a completion signal (audited); the running service's completion job
(``daemon.completion``) notices it within a second and writes the study SR as soon as
none of the study's instances waits for inference.
"""

from __future__ import annotations

import argparse

from sqlalchemy import select

from gastrolens.cli.common import add_config_option, cli_actor, open_database, settings_from
from gastrolens.db.tables import Study, utcnow
from gastrolens.db.transitions_services import request_completion


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("studies", help="act on studies")
    actions = parser.add_subparsers(dest="studies_command", metavar="ACTION", required=True)
    complete = actions.add_parser("complete", help="write the study SR now, without waiting for the quiet timer")
    add_config_option(complete)
    complete.add_argument("study_uid", metavar="UID", help="Study Instance UID")
    complete.set_defaults(func=run_complete)


def run_complete(args: argparse.Namespace) -> int:
    db = open_database(settings_from(args))
    try:
        with db.read_session() as session:
            known = session.scalar(select(Study.id).where(Study.study_instance_uid == args.study_uid))
        if known is None:
            print(f"no study {args.study_uid} has been received")
            return 1
        with db.session() as session:
            request_completion(session, args.study_uid, actor=cli_actor(), now=utcnow())
    finally:
        db.dispose()
    print(f"study {args.study_uid}: completion requested; the service writes its SR within seconds")
    return 0
