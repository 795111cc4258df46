#!/usr/bin/env python3
"""An example agent program for the ``research`` stage, run by phalanx's ``command`` runner.

phalanx starts it once per organisation, without a shell, with the argv of ``pipeline.yaml``,
the prompt on stdin, the instance's private staging folder as its working directory and
``PHALANX_*`` variables describing the instance. A real project would hand the prompt to an LLM
agent (``claude -p``, an SDK script); this stand-in follows the blueprint offline: it reads the
blueprint the prompt names, then writes deterministic fake activities and the sources it
"used" into its working directory.

Set ``PHALANX_TRACKER_FAIL=<organisation id>,...`` to make it exit with an error for those
organisations, to see retries and ``wip/notes.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

KINDS = ("product", "partnership", "hiring", "funding", "event")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--org", required=True, help="the organisation's id")
    parser.add_argument("--name", required=True, help="the organisation's name, as given")
    args = parser.parse_args(argv)
    prompt = sys.stdin.read()
    params = json.loads(os.environ["PHALANX_PARAMS"])
    if args.org in os.environ.get("PHALANX_TRACKER_FAIL", "").split(","):
        print(f"{args.org}: failing on purpose (PHALANX_TRACKER_FAIL)", file=sys.stderr)
        return 1
    if params["ORGANIZATION_NAME"] != args.name:  # argv and environment must agree exactly
        print(f"--name {args.name!r} != {params['ORGANIZATION_NAME']!r}", file=sys.stderr)
        return 2

    first_line = prompt.splitlines()[0] if prompt else ""
    named = re.search(r"`([^`]+)`", first_line)
    if named is None:
        print(f"the prompt names no blueprint: {first_line!r}", file=sys.stderr)
        return 2
    blueprint = (Path(os.environ["PHALANX_PROJECT_DIR"]) / named.group(1)).read_text("utf-8")
    title = next(line[2:] for line in blueprint.splitlines() if line.startswith("# "))

    period = str(params["PERIOD"])
    digest = hashlib.sha256(f"{args.org}/{period}".encode()).digest()
    activities = [
        {
            "date": f"{period}-{1 + digest[2 * i] % 28:02d}",
            "type": KINDS[digest[2 * i + 1] % len(KINDS)],
            "title": f"{args.name}: {KINDS[digest[2 * i + 1] % len(KINDS)]} announcement",
            "source": f"https://news.example.com/{args.org}/{period}/{i + 1}",
        }
        for i in range(1 + digest[0] % 4)
    ]
    activities.sort(key=lambda item: (item["date"], item["source"]))
    record = {
        "organization_id": args.org,
        "organization_name": args.name,
        "period": period,
        "activities": activities,
    }
    Path("activities.json").write_text(
        json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    sources = "".join(f"- {item['source']}\n" for item in activities)
    Path("sources.md").write_text(
        f"# 信息来源：{args.name}\n\n"
        f"Prompt received (first line): {first_line}\n\n"
        f"Blueprint followed: {named.group(1)} ({title})\n\n"
        f"{sources}",
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
