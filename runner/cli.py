"""`tessera` command line: run a job here (local Ray or RAY_ADDRESS), or submit one to a cluster and
follow it through the Ray Jobs API."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job (local Ray, or the cluster in RAY_ADDRESS)")
    run.add_argument("job", help="job YAML file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=20 pool.workers=2")
    submit = sub.add_parser("submit", help="submit a job to a cluster through the Ray Jobs API")
    submit.add_argument("job")
    submit.add_argument("overrides", nargs="*")
    submit.add_argument(
        "--address", help="Jobs API address, e.g. http://127.0.0.1:8265 (default RAY_ADDRESS)"
    )
    submit.add_argument("--working-dir", default=".", help="folder uploaded with the job (default: .)")
    submit.add_argument("--submission-id", default=None)
    for name, text in (
        ("status", "print a job's status"),
        ("logs", "print a job's logs"),
        ("stop", "stop a job"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("id", help="submission id printed by `tessera submit`")
        cmd.add_argument("--address")
    _add_pool_block(sub)
    return p


def _add_pool_block(sub) -> None:
    """`tessera pool ...`: the pool commands live with the pool (runner/pool/commands.py)."""
    from runner.pool.commands import add_pool_commands

    add_pool_commands(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from runner.run import main_run

        return main_run(args.job, args.overrides)
    if args.command == "pool":
        from runner.pool.commands import run_pool_command

        return run_pool_command(args)

    from runner import jobs
    from runner.config import JobConfigError

    try:
        if args.command == "submit":
            print(
                jobs.submit(
                    args.job,
                    args.overrides,
                    address=args.address,
                    working_dir=args.working_dir,
                    submission_id=args.submission_id,
                )
            )
        elif args.command == "status":
            print(jobs.status(args.id, address=args.address))
        elif args.command == "logs":
            print(jobs.logs(args.id, address=args.address), end="")
        elif args.command == "stop":
            print("stopped" if jobs.stop(args.id, address=args.address) else "not running")
    except (JobConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
