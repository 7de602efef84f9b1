"""Cancel a sweep: ``python -m service.cancel ID [--json] [--service URL]``.

A queued sweep is cancelled at once. For a running one a cancel is requested: the dispatcher
stops its Ray job (Tune saves its state; runs already logged stay in MLflow) and then marks it
cancelled. A finished sweep is left as it is. Idempotent.

Talks to the API when ``--service URL`` or SWEEP_SERVICE_URL is given, else to the local queue.
Exit codes: 0 ok (also when the sweep had already finished), 2 unknown sweep, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys

from service.client import ServiceError, open_sweeps
from worker.lifecycle import SweepState


def describe(v) -> str:
    if v.state == SweepState.CANCELLED:
        return f"{v.id}: cancelled"
    if v.state == SweepState.RUNNING and v.cancel_requested:
        return f"{v.id}: cancel requested; the dispatcher is stopping its Ray job (see: python -m service.status {v.id})"
    if v.state == SweepState.QUEUED and v.cancel_requested:
        return f"{v.id}: cancel requested"
    return f"{v.id}: already {v.state}; nothing to cancel"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.cancel", description="Cancel a sweep.")
    p.add_argument("id", help="the sweep id")
    p.add_argument("--json", action="store_true", help="print the sweep (SweepView JSON)")
    p.add_argument("--service", metavar="URL", help="the API (default $SWEEP_SERVICE_URL; else the local queue)")
    args = p.parse_args(argv)

    from service.settings import load

    try:
        with open_sweeps(load(), args.service) as src:
            v = src.cancel(args.id)
    except ServiceError as e:
        print(f"service.cancel: {e}", file=sys.stderr)
        return 2 if e.is_bad_input else 1
    print(v.model_dump_json(indent=2) if args.json else describe(v))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
