"""``nwbcache warm`` and ``nwbcache jobs``: warm-up jobs in the daemon, submitted and followed.

The daemon runs the job (POST /admin/warm); this only lists the targets
(admincli.resolve: URLs, DANDI asset sets) and follows the job with a
progress bar. Ctrl-C detaches: the job goes on, ``nwbcache jobs ID
--follow`` re-attaches, ``nwbcache jobs ID --cancel`` stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .admincli import AdminError, Api, common_options, resolve, size_text

# How often a followed job is asked for its progress.
POLL = 0.2
COMMANDS = ("warm", "jobs")


def add_commands(sub: Any) -> None:
    common = common_options()
    warm = sub.add_parser(
        "warm",
        parents=[common],
        help="fetch what opening files needs (or every byte) into the cache, ahead of readers",
        description="Warm the cache for the targets: by default the HDF5 metadata that "
        "opening each file with h5py and PyNWB reads (after it, PyNWB's io.read() through "
        "the cache asks S3 for nothing); with --full every byte. The daemon runs the job, "
        "--jobs files at once; Ctrl-C detaches from it (it goes on), `nwbcache jobs ID "
        "--follow` re-attaches. A job survives a daemon restart; cached blocks cost nothing.",
        epilog="Examples: nwbcache warm 000006@draft --jobs 8; nwbcache warm --full "
        "'000006/sub-anm372795/*.nwb'",
    )
    warm.add_argument("targets", nargs="+", metavar="TARGET",
                      help="URL, proxied URL, or DANDISET[@VERSION][/GLOB]")  # fmt: skip
    warm.add_argument("--full", action="store_true", help="every byte, not only the metadata")
    warm.add_argument("--jobs", type=int, default=4, help="files at once (1-16, default 4)")
    warm.add_argument("--detach", action="store_true", help="print the job's id and return")
    jobs = sub.add_parser(
        "jobs",
        parents=[common],
        help="list warm-up jobs, follow one, or cancel it",
        description="Without ID: the daemon's warm-up jobs. With ID: that job and its files.",
    )
    jobs.add_argument("id", nargs="?", help="a job's id")
    jobs.add_argument("--follow", action="store_true", help="follow it to its end (a bar)")
    jobs.add_argument("--cancel", action="store_true", help="stop it after the files running")


def run(api: Api, args: argparse.Namespace) -> int:
    if args.command == "warm":
        return _warm(api, args)
    return _jobs(api, args)


def _warm(api: Api, args: argparse.Namespace) -> int:
    if not 1 <= args.jobs <= 16:
        raise AdminError("--jobs takes 1 to 16", 2)
    targets = resolve(args.targets, api.base, args.dandi_api_url, keep_skipped=True)
    if not targets:
        raise AdminError("the targets name no file")
    files = [
        {"url": t.url, "label": t.label, **({"skip": t.skip} if t.skip else {})} for t in targets
    ]
    body = {"files": files, "mode": "full" if args.full else "metadata", "jobs": args.jobs}
    job = api.call("POST", "/admin/warm", body)
    if args.detach:
        print(job["id"])
        return 0
    return _follow(api, job["id"], as_json=args.json)


def _jobs(api: Api, args: argparse.Namespace) -> int:
    if args.id is None:
        if args.cancel or args.follow:
            raise AdminError("--cancel and --follow need a job's ID", 2)
        answer = api.call("GET", "/admin/jobs")
        if args.json:
            print(json.dumps(answer, indent=2))
            return 0
        for job in answer["jobs"]:
            print(_line(job))
        if not answer["jobs"]:
            print("no warm-up jobs")
        return 0
    if args.cancel:
        job = api.call("DELETE", f"/admin/jobs/{args.id}")
        print(f"{args.id}: cancel asked ({job['state']})")
        return 0
    if args.follow:
        return _follow(api, args.id, as_json=args.json)
    job = api.call("GET", f"/admin/jobs/{args.id}")
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    print(_line(job))
    for f in job["files"]:
        note = f" ({f['error']})" if f["error"] else ""
        print(f"  {f['state']:>8} {size_text(f['fetched_bytes']):>10} {f['seconds']:>7.1f} s  "
              f"{f['label']}{note}")  # fmt: skip
    return 0


def _follow(api: Api, job_id: str, *, as_json: bool) -> int:
    """Show the job's progress until it ends; Ctrl-C detaches."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar = None
    try:
        while True:
            job = api.call("GET", f"/admin/jobs/{job_id}?files=0")
            s = job["summary"]
            if bar is None:
                bar = tqdm(total=s["files"], unit="file", desc=f"warm {job_id}",
                           disable=as_json or None, file=sys.stderr)  # fmt: skip
            bar.n = s["done"] + s["failed"] + s["skipped"]
            bar.set_postfix_str(
                f"{size_text(s['fetched_bytes'])} fetched, "
                f"{size_text(s['bytes_per_second'])}/s, {s['failed']} failed",
                refresh=False,
            )
            bar.refresh()
            if job["state"] in ("done", "cancelled"):
                break
            time.sleep(POLL)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        sys.stderr.write(
            f"detached: job {job_id} goes on in the daemon. Re-attach with "
            f"`nwbcache jobs {job_id} --follow`; stop it with `nwbcache jobs {job_id} --cancel`\n"
        )
        return 130
    bar.close()
    job = api.call("GET", f"/admin/jobs/{job_id}")  # with its files, once
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        print(_line(job))
        for f in job["files"]:
            if f["state"] in ("failed", "skipped"):
                print(f"  {f['state']}: {f['label']}: {f['error']}")
    return 0 if job["summary"]["failed"] == 0 and job["state"] == "done" else 1


def _line(job: dict[str, Any]) -> str:
    s = job["summary"]
    return (
        f"{job['id']}  {job['state']:>9}  {job['mode']:>8}  {s['done']}/{s['files']} done, "
        f"{s['failed']} failed, {s['skipped']} skipped, {size_text(s['fetched_bytes'])} "
        f"fetched in {s['elapsed_seconds']:.1f} s"
    )
