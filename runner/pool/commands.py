"""`tessera pool list | stop NAME | stop --all | warm JOB.yaml`: pools on a running cluster.

The cluster is `--address` or RAY_ADDRESS (a GCS address, host:port); pools live only on a cluster
that outlives its jobs, so there is nothing to list without one. Errors are one line on stderr
with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_pool_commands(sub) -> None:
    """The `pool` subcommand and its actions, on the CLI's subparsers."""
    pool = sub.add_parser("pool", help="list, stop or warm model-worker pools on a cluster")
    actions = pool.add_subparsers(dest="pool_command", required=True)
    listing = actions.add_parser("list", help="pools with their model, workers, resources and idle time")
    stop = actions.add_parser("stop", help="stop a pool (its workers and their GPUs)")
    stop.add_argument("name", nargs="?", help="the pool's name (pool.name of its jobs)")
    stop.add_argument("--all", action="store_true", help="stop every pool")
    stop.add_argument("--force", action="store_true", help="stop even while jobs use it")
    warm = actions.add_parser("warm", help="create a job's pool and load its model, without running it")
    warm.add_argument("job", help="job YAML file")
    warm.add_argument("overrides", nargs="*", help="key=value overrides, as for `tessera run`")
    for cmd in (listing, stop, warm):
        cmd.add_argument("--address", help="the cluster (host:port of its GCS; default RAY_ADDRESS)")


def run_pool_command(args: argparse.Namespace) -> int:
    import ray  # here, not at import: the CLI's parser is built without Ray

    from runner.pool.lifecycle import NAMESPACE, PoolInUseError

    if args.pool_command == "stop" and bool(args.name) == bool(args.all):
        print("error: give a pool name or --all", file=sys.stderr)
        return 2
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        print(
            "error: no cluster: set RAY_ADDRESS or --address (pools live on a running cluster)",
            file=sys.stderr,
        )
        return 2
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="warning")
    except (ConnectionError, ValueError, RuntimeError) as err:
        print(f"error: cannot connect to the Ray cluster at {address}: {err}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args)
    except (KeyError, PoolInUseError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()


def _dispatch(args: argparse.Namespace) -> int:
    from runner.pool.lifecycle import list_pools, stop_all, stop_pool
    from runner.pool.placement import amount

    if args.pool_command == "list":
        print_table([p.row() for p in list_pools()])
    elif args.pool_command == "stop" and args.all:
        stopped, refused = stop_all(force=args.force)
        for name, count in stopped.items():
            print(f"stopped pool {name!r} ({amount(count, 'worker')})")
        for message in refused.values():
            print(f"error: {message}", file=sys.stderr)
        if not stopped and not refused:
            print("no pools")
        return 2 if refused else 0
    elif args.pool_command == "stop":
        print(f"stopped pool {args.name!r} ({amount(stop_pool(args.name, force=args.force), 'worker')})")
    elif args.pool_command == "warm":
        return _warm(args.job, args.overrides)
    return 0


def _warm(path: str, overrides: list[str]) -> int:
    import ray

    from runner.config import JobConfigError, load_job
    from runner.pool.placement import amount
    from runner.pool.pool import connect_pool

    try:
        job = load_job(path, overrides)
        if job.task.needs != "pool":
            raise JobConfigError(f"{path}: task {job.task.name!r} runs on no pool")
        pool = connect_pool(job.runner.pool, job.config.model)
    except JobConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ray.get([w.end_job.remote(pool.job) for w in pool.workers])  # warm, not held
    print(f"pool {pool.name!r} is warm: {amount(pool.size, 'worker')}, model loaded")
    return 0


def print_table(rows: list[dict[str, str]]) -> None:
    if not rows:
        print("no pools")
        return
    cols = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
