"""``python -m renorm.testing``: every installed port of this project (or the peers) against the oracle.

Exit status: 0 when every case that ran passed, 1 when any failed, 2 on bad usage (an unknown backend, a framework
that is not installed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import time

from renorm.testing._driver import check
from renorm.testing._registry import CASES, PEER_CASES, REDUCED_CASES, TOLERANCES

DTYPES = tuple(TOLERANCES)


def _parser() -> argparse.ArgumentParser:
    from renorm.testing.adapters import BACKENDS
    from renorm.testing.peers import PEERS

    p = argparse.ArgumentParser(
        prog="python -m renorm.testing",
        description="Check Batch Renormalization implementations against the NumPy oracle (docs/SPEC.md, section 9). "
        "Without --backend or --peer: every installed backend of this project.",
    )
    p.add_argument(
        "--backend",
        action="append",
        choices=list(BACKENDS),
        metavar="NAME",
        help=f"a port of this project ({', '.join(BACKENDS)}); repeatable. The Keras backend is chosen "
        "the Keras way, with KERAS_BACKEND",
    )
    p.add_argument(
        "--peer",
        action="append",
        choices=list(PEERS),
        metavar="NAME",
        help=f"another library's layer ({', '.join(PEERS)}), on the peers' cases; repeatable",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, gpu, cuda or cuda:N where the framework has it (default: the framework's default)",
    )
    p.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        metavar="DTYPE",
        help=f"repeatable, one of {', '.join(DTYPES)} (default: float64 where the framework has it, "
        "float32, and bfloat16 on the reduced cases)",
    )
    p.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _usage_error(message: str) -> None:
    print(f"python -m renorm.testing: {message}", file=sys.stderr)
    raise SystemExit(2)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class _Progress:
    """A progress bar on standard error: tqdm's where installed, else one line rewritten in place."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled and total > 0, None
        if self.enabled and _installed("tqdm"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", file=sys.stderr, leave=False)

    def __call__(self, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.set_description(label)
        else:
            print(f"\r[{self.done + 1}/{self.total}] {label[:60]:60}", end="", file=sys.stderr, flush=True)
        self.done += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()
        elif self.enabled:
            print("\r" + " " * 80 + "\r", end="", file=sys.stderr, flush=True)


def _plan(backend, adapter, dtypes):
    """(cases, dtype) pairs for one adapter: the registry in float64/float32, the reduced cases below."""
    out = []
    for d in dtypes:
        out.append((REDUCED_CASES if d in ("float16", "bfloat16") else CASES, d))
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from renorm.testing.adapters import BACKENDS, adapter_for
    from renorm.testing.peers import PEERS, WARMUP_CASES, peer_adapters

    backends, peers = args.backend or [], args.peer or []
    if not backends and not peers:
        backends = [b for b, (mod, _) in BACKENDS.items() if _installed(mod)]
        if not backends:
            _usage_error('no backend is installed: pip install "renorm[tf]", "renorm[jax]" or "renorm[torch]"')
    for b in backends:
        mod, how = BACKENDS[b]
        if not _installed(mod):
            _usage_error(f"--backend {b} needs {mod}, which is not installed: {how}")
    for name in peers:
        mod, how = PEERS[name]
        if not _installed(mod):
            _usage_error(f"--peer {name} needs {mod}, which is not installed: {how}")
    uses_jax = any(b in ("linen", "nnx") for b in backends) or "sbx" in peers
    if uses_jax and (args.dtype is None or "float64" in args.dtype):
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 parity needs it; float32 arrays stay float32
    dtypes = args.dtype or ["float64", "float32", "bfloat16"]

    jobs = []  # (label, adapter, cases, dtype)
    for b in backends:
        try:
            adapters = adapter_for(b, device=args.device)
        except Exception as exc:  # noqa: BLE001 - a device the framework lacks
            _usage_error(f"--backend {b} --device {args.device}: {exc}")
        for a in adapters:
            for cases, d in _plan(b, a, dtypes):
                jobs.append((b, a, cases, d))
    for name in peers:
        for a in peer_adapters(name, device=args.device):
            for d in [d for d in dtypes if d in ("float64", "float32")] or ["float32"]:
                jobs.append((name, a, PEER_CASES + WARMUP_CASES, d))  # an adapter without a warm-up skips its case

    total = sum(len(cases) for _, _, cases, _ in jobs)
    progress = _Progress(
        total, enabled=not args.no_progress and sys.stderr.isatty() or bool(os.environ.get("RENORM_PROGRESS"))
    )
    reports = []
    start = time.time()
    try:
        for label, adapter, cases, d in jobs:
            reports.append((label, check(adapter, cases, dtype=d, progress=progress)))
    finally:
        progress.close()
    print(_table(reports))
    ok = all(r.passed or not r.ran for _, r in reports) and any(r.ran for _, r in reports)
    print(
        f"\n{'every case passed' if ok else 'FAILED'} ({sum(len(r.ran) for _, r in reports)} case runs, "
        f"{time.time() - start:.0f} s)"
    )
    if not ok:
        for _, r in reports:
            for f in r.failures[:3]:
                print(f"  {r.implementation}: {f}")
    if args.json:
        doc = {
            "command": "python -m renorm.testing " + " ".join(argv if argv is not None else sys.argv[1:]),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "passed": ok,
            "reports": [{"backend": label, **r.to_dict()} for label, r in reports],
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=float)
            f.write("\n")
    return 0 if ok else 1


def _table(reports) -> str:
    from renorm.testing._driver import QUANTITIES

    head = ["backend", "implementation", "dtype", "cases", "result", *QUANTITIES]
    rows = []
    for label, r in reports:
        ran = r.ran
        d = r.results[0].dtype if r.results else "-"
        verdict = "skip" if not ran else ("pass" if r.passed else "FAIL")
        errs = r.largest_errors()
        cells = [label, r.implementation, d, f"{len(ran)}/{len(r.results)}", verdict]
        cells += [
            "-" if errs[q] is None else (f"{errs[q]:g}" if QUANTITIES[q] == "exact" else f"{errs[q]:.0e}")
            for q in QUANTITIES
        ]
        rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows])


if __name__ == "__main__":
    sys.exit(main())
