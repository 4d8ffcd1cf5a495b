"""The line protocol between benchmarks/compare.py and one worker process (stdlib only: workers
run in the peers' own virtual environments).

The worker builds its model, times the first call, then answers commands on stdin:
``run`` -> times one more call; ``quit`` -> reports the process's peak resident memory and exits.
Every answer is one stdout line starting with ``@@`` followed by JSON (other output is noise from
the frameworks and is ignored).
"""

import json
import resource
import sys
import time


def answer(**fields):
    sys.stdout.write("@@" + json.dumps(fields) + "\n")
    sys.stdout.flush()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def training_steps(state: dict, step, warmup_steps: int, steps: int, batch: int,
                   traces=None):
    """run_once for an end-to-end training loop: the first call runs one step, the second
    ``warmup_steps`` (new input shapes still trace), every later call ``steps``; each step is
    timed. ``step()`` runs one training step and returns its loss as a float. ``traces()``, if
    given, counts the graphs traced so far: a step during which it grew is flagged in
    ``traced_steps`` (it paid for a trace, once per new input shape, besides its own work)."""
    def run_once():
        calls = state.get("calls", 0)
        n = {0: 1, 1: warmup_steps}.get(calls, steps)
        state["calls"] = calls + 1
        times, traced, loss = [], [], None  # n is 0 for --e2e_warmup 0
        for _ in range(n):
            before = traces() if traces else 0
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
            traced.append(bool(traces and traces() > before))
        return {"images": n * batch, "step_times": times, "traced_steps": traced, "loss": loss}
    return run_once


def serve(run_once, build=None, describe=None):
    """build() -> None (timed as build_s); run_once() -> optional dict of extras; the first
    call is timed as first_call_s, each ``run`` as seconds."""
    t0 = time.perf_counter()
    if build is not None:
        build()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    extra = run_once() or {}
    first = time.perf_counter() - t0
    answer(ready=True, build_s=build_s, first_call_s=first, describe=describe or {}, **extra)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            t0 = time.perf_counter()
            extra = run_once() or {}
            answer(seconds=time.perf_counter() - t0, **extra)
        elif cmd == "quit":
            answer(peak_rss_mb=peak_rss_mb())
            return
        else:
            answer(error=f"unknown command {cmd!r}")
