"""Runs many command lines of hybrid_r1's CLIs in one process (startup dominates a subprocess per case).

    python tests/cli_cases.py CASES.json RESULTS.json

CASES.json: [{"id", "cli": "hybrid-r1"|"chat"|"merge_tools", "argv": [...], "stdin": latin-1 text of
the bytes or null}]. Each case runs the CLI's main() with its own stdin, stdout and stderr; an
exception that escapes main is written to the case's stderr as the traceback a user would see, and a
case that runs past 60 s is recorded as a hang. RESULTS.json: [{"id", "rc", "stderr", "stdout"}].
A signal (SIGSEGV) kills the whole run: the test then names the case that was running (printed
to this process's stderr before each case).
"""

from __future__ import annotations

import io
import json
import signal
import sys
import traceback


class Hang(Exception):
    pass


def _main(cli: str):
    if cli == "hybrid-r1":
        from hybrid_r1.cli import main
    elif cli == "chat":
        from hybrid_r1.chat import main
    elif cli == "merge_tools":
        from hybrid_r1_merge_tools.cli import main
    else:
        raise ValueError(f"unknown cli {cli!r}")
    return main


def run_case(case: dict) -> dict:
    main = _main(case["cli"])
    stdin_bytes = (case.get("stdin") or "").encode("latin-1")
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin_bytes), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", errors="backslashreplace", write_through=True)
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    signal.alarm(60)
    try:
        rc = main(case["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Hang:
        rc = "hang"
    except BaseException:  # what would be a traceback on the user's terminal
        sys.stderr.write(traceback.format_exc())
        rc = 1
    finally:
        signal.alarm(0)
        sys.stdout.flush()
        sys.stderr.flush()
        texts = out.getvalue().decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace")
        sys.stdin, sys.stdout, sys.stderr = saved  # the wrappers close their buffers when dropped
    return {"id": case["id"], "rc": rc, "stdout": texts[0], "stderr": texts[1]}


def main() -> int:
    cases_file, results_file = sys.argv[1:3]
    cases = json.loads(open(cases_file, encoding="utf-8").read())

    def on_alarm(signum, frame):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    results = []
    for case in cases:
        print(f"case {case['id']}", file=sys.stderr, flush=True)
        results.append(run_case(case))
    with open(results_file, "w", encoding="utf-8") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
