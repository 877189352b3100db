"""`tessera` command line: run a job here (a local Ray, or the cluster in --address / RAY_ADDRESS),
or submit one to a cluster through the Ray Jobs API and follow it (status, logs, stop, list, fetch).

Errors a user can act on (a bad job file, an unknown submission id, an unreachable address or
storage) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

ADDRESS_HELP = "Jobs API address, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="store_true", help="print the version and the git commit")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a job (a local Ray, or the cluster in --address / RAY_ADDRESS)")
    run.add_argument("job", help="job YAML file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=20 pool.workers=2")
    run.add_argument(
        "--address", help="cluster to join: HOST:6379, ray://HOST:10001 or auto (default: RAY_ADDRESS)"
    )
    run.add_argument(
        "--dry-run",
        "--print-config",
        dest="dry_run",
        action="store_true",
        help="print the resolved job and its sweep, check the inputs, and exit",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace another job's files in the output (kept in attempts/)",
    )
    run.add_argument("--allow-large", action="store_true", help="run a job above the pixel budget")
    submit = sub.add_parser("submit", help="submit a job to a cluster through the Ray Jobs API")
    submit.add_argument("job")
    submit.add_argument("overrides", nargs="*")
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--submission-id", default=None)
    submit.add_argument(
        "--storage", help="URI or shared path under which a relative output goes, e.g. s3://BUCKET/tessera"
    )
    submit.add_argument(
        "--inputs-on-cluster",
        action="store_true",
        help="input paths are absolute paths on the cluster's nodes: checked there, not uploaded",
    )
    for name, text in (("status", "print a job's status"), ("stop", "stop a job")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("id", help="submission id printed by `tessera submit`")
        cmd.add_argument("--address", help=ADDRESS_HELP)
    logs = sub.add_parser("logs", help="print a job's logs")
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--address", help=ADDRESS_HELP)
    listing = sub.add_parser("list", help="list submitted jobs")
    listing.add_argument("--all", action="store_true", help="every job of the cluster, not only Tessera's")
    listing.add_argument("--address", help=ADDRESS_HELP)
    fetch = sub.add_parser("fetch", help="copy a submitted job's results here")
    fetch.add_argument("id")
    fetch.add_argument("dest", nargs="?", help="folder to copy into (default: ./<output's name>)")
    fetch.add_argument("--address", help=ADDRESS_HELP)
    _add_pool_block(sub)
    return p


def _add_pool_block(sub) -> None:
    """`tessera pool ...`: the pool commands live with the pool (runner/pool/commands.py)."""
    from runner.pool.commands import add_pool_commands

    add_pool_commands(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may follow flags (`run JOB --dry-run k=v`): argparse leaves those over
    args, extra = parser.parse_known_args(argv)
    if extra and (getattr(args, "overrides", None) is None or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.version:
        from runner.summary import version_line

        print(version_line())
        return 0
    if args.command is None:
        parser.print_usage(sys.stderr)
        return 2
    if args.command == "pool":
        from runner.pool.commands import run_pool_command

        return run_pool_command(args)
    from runner.address import AddressError
    from runner.config import JobConfigError
    from runner.jobs import JobsError
    from runner.storage import StorageError

    try:
        return _run(args) if args.command == "run" else _jobs_command(args)
    except (JobConfigError, AddressError, JobsError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from runner.address import check_reachable, cluster_address
    from runner.config import load_job
    from runner.storage import StagedOutput, is_uri, parse_location

    address = cluster_address(args.address, os.environ)
    job = load_job(args.job, args.overrides)
    if args.dry_run:
        return _dry_run(args, job)
    if address is not None:
        check_reachable(address)
        # ray_init joins RAY_ADDRESS: the flag becomes this process's cluster, as Ray's tools read it
        os.environ["RAY_ADDRESS"] = address.value
    from runner.run import main_run

    checks = {"overwrite": args.overwrite, "allow_large": args.allow_large}
    if not is_uri(job.runner.output):
        return main_run(args.job, args.overrides, **checks)
    location = parse_location(job.runner.output)
    with StagedOutput(location) as staged:
        print(f"[storage] {location.uri} staged in {staged.folder}", flush=True)
        code = main_run(args.job, [*args.overrides, f"output={staged.folder}"], **checks)
    print(f"[storage] results in {location.uri} ({len(staged.files)} files)", flush=True)
    return code


def _dry_run(args, job) -> int:
    import yaml

    from runner.jobs import preflight
    from runner.sweep import expand, folder_name

    print(yaml.safe_dump(job.resolved, sort_keys=False), end="")
    if job.runner.sweep:
        from pathlib import Path

        combos = expand(job.runner.sweep, Path(args.job).resolve().parent)
        print(f"# sweep: {len(combos)} jobs")
        for i, coords in enumerate(combos):
            values = " ".join(f"{k}={v}" for k, v in coords.items())
            print(f"#   {job.runner.output}/{folder_name(i, coords)}: {values}")
    checked = preflight(args.job, args.overrides, job)
    print(f"# inputs checked for {checked} job{'s' if checked > 1 else ''}; dry run: nothing started")
    return 0


def _jobs_command(args) -> int:
    from runner import jobs
    from runner.address import check_reachable, jobs_address

    address = jobs_address(args.address, os.environ)
    check_reachable(address)
    # Ray's JobSubmissionClient prefers RAY_API_SERVER_ADDRESS over its argument: make the address
    # resolved here (the flag first) this process's Jobs address, so the flag wins as documented.
    os.environ["RAY_API_SERVER_ADDRESS"] = address.value
    addr = address.value
    if args.command == "submit":
        s = jobs.submit(
            args.job,
            args.overrides,
            address=addr,
            submission_id=args.submission_id,
            storage=args.storage,
            inputs_on_cluster=args.inputs_on_cluster,
        )
        uploaded = ", ".join(f"{k}: {', '.join(v)}" for k, v in s.inputs.items()) or "none"
        print(
            f"submitted to {addr}: package {s.package_mib} MiB (weights: {', '.join(s.weights) or 'none'}; "
            f"inputs: {uploaded}); results go to {s.output}\n"
            f"follow: tessera logs --follow {s.submission_id}; fetch: tessera fetch {s.submission_id}",
            file=sys.stderr,
        )
        print(s.submission_id)
    elif args.command == "status":
        print(jobs.status(args.id, address=addr))
    elif args.command == "logs":
        if args.follow:
            final = jobs.follow_logs(args.id, address=addr)
            print(f"[tessera] job {args.id} {final}", file=sys.stderr)
        else:
            print(jobs.logs(args.id, address=addr), end="")
    elif args.command == "stop":
        print("stopped" if jobs.stop(args.id, address=addr) else "not running")
    elif args.command == "list":
        rows = jobs.list_jobs(address=addr, all_jobs=args.all)
        print(f"{'SUBMISSION ID':<24} {'STATUS':<10} {'STARTED':<19} {'TASK':<16} OUTPUT")
        for r in rows:
            print(f"{r.submission_id:<24} {r.status:<10} {r.started:<19} {r.task:<16} {r.output}")
    elif args.command == "fetch":
        loc, target, files, status = jobs.fetch(args.id, args.dest, address=addr)
        print(f"fetched {len(files)} files from {loc.uri} to {target} (job {status})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
