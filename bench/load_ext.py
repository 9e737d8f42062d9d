"""What ``%load_ext first_jupyter`` costs in a fresh kernel, against IPython's own ``autoreload`` extension.

Why: jupyter-ai's magics are slow to load, and a magic people put in the first cell of every notebook must
not be. Each round starts a new kernel (so nothing is already imported), loads the baseline extension and
ours in it, timed inside the kernel with ``time.perf_counter``, and lists which heavy modules ours pulled in
that were not there before it (none should be: the client, ``openai`` and the gateway load on first use).

Run ``python bench/load_ext.py`` (about 20 s; ``--rounds N``). Exit status 0 when the median is within the
150 ms target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from jupyter_client.manager import start_new_kernel

TARGET_MS = 150.0
HEAVY = ("openai", "pydantic", "orjson", "yaml", "httpx", "first_jupyter.client", "first_jupyter.gateway")
PROBE = """
import json as _json, sys as _sys, time as _time
_ip = get_ipython()
_t0 = _time.perf_counter(); _ip.run_line_magic("load_ext", "autoreload"); _t1 = _time.perf_counter()
_before = set(_sys.modules)
_ip.run_line_magic("load_ext", "first_jupyter"); _t2 = _time.perf_counter()
print(_json.dumps({"baseline_ms": (_t1 - _t0) * 1000, "first_ms": (_t2 - _t1) * 1000,
                   "heavy": sorted(m for m in set(_sys.modules) - _before if m.startswith(%r))}))
"""


def one_round() -> dict[str, object]:
    """A new kernel, the probe run in it, the kernel shut down (whatever happened)."""
    manager, client = start_new_kernel(kernel_name="python3", stderr=subprocess.DEVNULL)
    try:
        reply = client.execute_interactive(PROBE % (HEAVY,), timeout=60,
                                           output_hook=lambda msg: outputs.append(msg))
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the probe failed in the kernel: {reply['content']}")
        text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
        return dict(json.loads(text.strip().splitlines()[-1]))
    finally:
        outputs.clear()
        client.stop_channels()
        manager.shutdown_kernel(now=True)


outputs: list[dict[str, object]] = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="fresh kernels to measure in (default 5)")
    args = parser.parse_args(argv)
    rounds = [one_round() for _ in range(args.rounds)]
    first = [float(r["first_ms"]) for r in rounds]  # type: ignore[arg-type]
    baseline = [float(r["baseline_ms"]) for r in rounds]  # type: ignore[arg-type]
    heavy = sorted({m for r in rounds for m in r["heavy"]})  # type: ignore[attr-defined]
    median = statistics.median(first)
    print(f"%load_ext in a fresh kernel, {args.rounds} kernels")
    print(f"  first_jupyter  median {median:7.1f} ms   max {max(first):7.1f} ms")
    print(f"  autoreload     median {statistics.median(baseline):7.1f} ms   max {max(baseline):7.1f} ms   "
          f"(IPython's own extension, the baseline)")
    print(f"  ratio          {median / max(statistics.median(baseline), 1e-6):.1f}x the baseline")
    print(f"  heavy modules imported by it: {', '.join(heavy) or 'none'}")
    ok = median <= TARGET_MS and not heavy
    print(f"target: median <= {TARGET_MS:g} ms and no heavy import: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
