"""Other libraries' Batch Renorm layers against the oracle: the report of docs/conformance.md.

    PYTHONPATH=~/peers python -m benchmarks.conformance            # every peer: benchmarks/results/conformance.json
    PYTHONPATH=~/peers python -m benchmarks.conformance --peer sbx  # one peer: benchmarks/results/scratch/
    python -m benchmarks.conformance --table                       # the Markdown tables, from the committed JSON

Each peer of ``renorm.testing.peers`` (Keras 3 on every installed Keras backend) runs in a process of its own
through the driver, ``renorm.testing.check``: the peer cases (``PEER_CASES``) and, for a layer with a warm-up,
the warm-up case (``WARMUP_CASES``), in float32 and float64, with the specification's momentum 0.99 and Keras's
epsilon 1e-3. The report gives per configuration and version whether it conforms, the largest error per quantity
and the recorded causes of each deviation with the file and line of the version tested. A peer that is not
installed is skipped with one line; a run that skips one, or that names ``--peer``, is partial and writes the
git-ignored scratch folder, so that it never replaces the committed report.

Install the peers as docs/conformance.md says (``pip install --no-deps --target ~/peers ...``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

from benchmarks.common import machine_info, scratch_path, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("benchmarks", "results", "conformance.json")
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
DTYPES = ("float32", "float64")
# The quantities of the Markdown table (the JSON has every one the driver compares).
TABLE_QUANTITIES = ("y", "dx", "dgamma", "mean", "stddev", "inference")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _jobs(peers: list[str]) -> tuple[list[tuple[str, str | None]], list[dict]]:
    """``(peer, keras backend)`` per worker process, and the peers skipped (not installed) with why."""
    from renorm.testing.peers import PEERS

    jobs, skipped = [], []
    for peer in peers:
        module, how = PEERS[peer]
        if not _installed(module):
            skipped.append({"peer": peer, "why": f"{module} is not installed: {how}"})
            continue
        if peer == "keras":
            jobs += [(peer, b) for b in KERAS_BACKENDS if _installed(b)]
        else:
            jobs.append((peer, None))
    return jobs, skipped


def _relative(text: str) -> str:
    """An exception's text with the machine's folders left out of its file names (``File ".../keras/src/..."``)."""
    return re.sub(
        r'File "[^"]*?/((?:renorm|keras|tf_keras|tensorflow|torch|torchrl|sb3_contrib|sbx)/)', r'File "\1', text
    )


def _row(peer: str, backend: str | None, adapter, report, group: str) -> dict:
    from renorm.testing.peers import causes

    dtype = report.results[0].dtype
    recorded = causes(adapter, warmup=(group == "warm-up"), dtype=dtype, backend=backend)
    cases = []
    for r in report.results:
        d = r.to_dict()
        d.pop("steps")  # per-step errors: in the driver's own JSON (python -m renorm.testing --json)
        if d["failure"] is not None:
            d["failure"] = {k: _relative(v) if isinstance(v, str) else v for k, v in d["failure"].items()}
        cases.append(d)
    return {
        "peer": peer,
        "key": adapter.key,
        "backend": backend,
        "implementation": report.implementation,
        "version": adapter.peer_version(),
        "versions": report.versions,
        "settings": report.settings,
        "cases": group,
        "dtype": dtype,
        "ran": bool(report.ran),
        "conforms": report.passed if report.ran else None,
        "largest_errors": report.largest_errors(),
        "first_failure": _relative(str(report.failures[0])) if report.failures else None,
        "causes_recorded": recorded is not None,
        "causes": [{"text": c.text, "where": c.where, "kind": c.kind} for c in recorded or []],
        "results": cases,
    }


def worker(peer: str, backend: str | None) -> list[dict]:
    """Every configuration of ``peer`` on its cases and dtypes, in this process (``KERAS_BACKEND`` already set)."""
    if _installed("jax"):
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 for sbx and Keras's JAX backend; float32 stays float32
    from renorm.testing import PEER_CASES, check
    from renorm.testing.peers import WARMUP_CASES, peer_adapters

    rows = []
    for adapter in peer_adapters(peer):
        groups = [("peer cases", PEER_CASES)] + ([("warm-up", WARMUP_CASES)] if adapter.has_warmup else [])
        for group, cases in groups:
            for dtype in DTYPES:
                rows.append(_row(peer, backend, adapter, check(adapter, cases, dtype=dtype), group))
    return rows


def run(jobs: list[tuple[str, str | None]]) -> list[dict]:
    """The rows of every job, each in a worker process of its own."""
    rows = []
    for peer, backend in jobs:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if backend is not None:
            env["KERAS_BACKEND"] = backend
        print(f"{peer}{f' (Keras {backend} backend)' if backend else ''} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            cmd = [sys.executable, "-m", "benchmarks.conformance", "--worker", peer, "--worker-out", out]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{peer} ({backend}): the worker failed:\n{proc.stderr[-4000:]}")
            with open(out) as f:
                rows += json.load(f)
    return rows


# --- The Markdown tables ---


def _fmt(e) -> str:
    return "-" if e is None else f"{e:.1e}"


def _verdict(rows: list[dict]) -> str:
    out = []
    for dtype in DTYPES:
        r = next((r for r in rows if r["dtype"] == dtype), None)
        if r is None or not r["ran"]:
            out.append("-")
        elif r["conforms"]:
            out.append("yes")
        else:
            out.append("raises" if r["first_failure"] and " raised " in r["first_failure"] else "no")
    return " / ".join(out)


def _groups(rows: list[dict]) -> list[list[dict]]:
    """The rows of one configuration, backend and case group (both dtypes), in the order they ran."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["key"], r["backend"], r["cases"]), []).append(r)
    return list(groups.values())


def _label(r: dict) -> str:
    label = r["implementation"]
    if r["cases"] == "warm-up":
        label += ", warmup_steps=2 (case peer_warmup)"
    return label


def _applies(c: dict) -> str:
    parts = []
    if c["warmup_only"]:
        parts.append("with a warm-up")
    if c["dtypes"]:
        parts.append(", ".join(c["dtypes"]))
    if c["backends"]:
        parts.append(", ".join(c["backends"]) + (" backend" if len(c["backends"]) == 1 else " backends"))
    return "; ".join(parts) or "always"


def recorded_causes(rows: list[dict]) -> dict:
    """Per configuration key that ran: its peer, version and every cause recorded for that version (``None``:
    none recorded), with where each applies."""
    import dataclasses

    from renorm.testing.peers import CAUSES

    out = {}
    for r in rows:
        found = CAUSES.get(r["key"], {}).get(r["version"])
        out[r["key"]] = {
            "peer": r["peer"],
            "version": r["version"],
            "causes": None if found is None else [dataclasses.asdict(c) for c in found],
        }
    return out


def tables(data: dict) -> str:
    """The results table (float32 errors, both verdicts) and the causes table of docs/conformance.md."""
    head = ["implementation", "version", "conforms (float32 / float64)", *TABLE_QUANTITIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in _groups(data["rows"]):
        f32 = next((r for r in g if r["dtype"] == "float32"), g[0])
        errs = [_fmt(f32["largest_errors"].get(q)) if f32["ran"] else "-" for q in TABLE_QUANTITIES]
        lines.append(f"| {_label(f32)} | {f32['version']} | {_verdict(g)} | " + " | ".join(errs) + " |")
    lines += ["", "| peer | version | configurations | kind | applies to | cause | where |", "|" + "---|" * 7]
    causes: dict[tuple, tuple[dict, list[str]]] = {}  # (peer, version, cause) -> (cause, its configurations)
    for key, rec in data["causes"].items():
        if rec["causes"] is None:
            lines.append(f"| {rec['peer']} | {rec['version']} | {key} | | | no causes recorded for this version | |")
        for c in rec["causes"] or []:
            causes.setdefault((rec["peer"], rec["version"], c["file"], c["line"], c["text"]), (c, []))[1].append(key)
    for (peer, version, *_), (c, keys) in causes.items():
        lines.append(
            f"| {peer} | {version} | {', '.join(keys)} | {c['kind']} | {_applies(c)} | {c['text']} | "
            f"`{c['file']}:{c['line']}` |"
        )
    if data.get("skipped"):
        lines += ["", "Not installed, skipped: " + ", ".join(s["peer"] for s in data["skipped"]) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from renorm.testing.peers import PEERS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer", action="append", choices=list(PEERS), help="only this peer (repeatable): a partial run")
    p.add_argument(
        "--out",
        default=None,
        help=f"JSON file (default: {DEFAULT_OUT} for a full run, the scratch folder for a partial one)",
    )
    p.add_argument("--table", action="store_true", help="print the Markdown tables of the committed (or --out) JSON")
    p.add_argument("--worker", choices=list(PEERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        rows = worker(args.worker, os.environ.get("KERAS_BACKEND") if args.worker == "keras" else None)
        with open(args.worker_out, "w") as f:
            json.dump(rows, f, default=float)
        return 0
    if args.table:
        with open(args.out or DEFAULT_OUT) as f:
            print(tables(json.load(f)))
        return 0
    jobs, skipped = _jobs(args.peer or list(PEERS))
    for skip in skipped:
        print(f"skipping {skip['peer']}: {skip['why']}", file=sys.stderr)
    full = not args.peer and not skipped
    out = args.out or (DEFAULT_OUT if full else scratch_path(DEFAULT_OUT))
    if not full and os.path.abspath(out) == os.path.abspath(DEFAULT_OUT):
        p.error(f"{DEFAULT_OUT} holds the full report; a run with --peer or a peer missing cannot replace it")
    rows = run(jobs)
    given = sys.argv[1:] if argv is None else list(argv)
    data = {
        "machine": machine_info(),
        "momentum": 0.99,
        "epsilon": 1e-3,
        "rows": rows,
        "causes": recorded_causes(rows),
        "skipped": skipped,
    }
    print(tables(data))
    write_results(out, data | {"full": full, "command": " ".join(["python -m benchmarks.conformance", *given])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
