"""Layer suite, PyTorch: renorm.torch.BatchRenorm2d/1d against torch.nn.BatchNorm2d/1d, side by side.

    python -m benchmarks.layers_torch [--quick] [--no-compile] [--device cuda] [--out FILE]

For each shape: one training forward+backward (``y.backward(dy)``: gradients
of the input and the parameters, moving statistics updated), for batch norm,
renorm on the whole batch and renorm with micro-batches of 4 and 2, eagerly
and under ``torch.compile`` (inductor, CPU), interleaved in one process
(``benchmarks/common.py``). Ratios are per round: ``vs_baseline`` to eager
``torch.nn.BatchNorm``, ``vs_whole`` of a micro-batch candidate to renorm
on the whole batch in the same mode, ``vs_floor`` to one eager
``torch.addcmul`` pass over the tensor. The JSON's ``machine`` records the
load averages at the end of the run; on a shared machine trust the paired
ratios and their spread, not the milliseconds.

Then, for the eager candidates only, the same interleaved rounds on one
thread timed by the thread's CPU time (``time.thread_time``):
``cpu1_vs_baseline`` and ``cpu1_vs_whole``, the same ratios of work done. On a
loaded machine the wall-clock ratios with 2 threads also measure how often
each kernel launch waits for a descheduled thread (many small kernels lose
more than a few fused ones); the CPU-time ratios do not.

``--device cuda`` (or ``cuda:N``) runs the same candidates on a GPU, each
timed call ending with ``torch.cuda.synchronize()``, inductor compiling for
the GPU; the one-thread CPU-time ratios are left out there, and a full run
writes ``benchmarks/results/layers_torch-gpu.json`` beside the CPU results.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from benchmarks.common import (
    device_results,
    machine_info,
    markdown_table,
    measure,
    parse_args,
    scratch_path,
    summarize,
    write_results,
)
from renorm.torch import BatchRenorm1d, BatchRenorm2d

SHAPES = [(256, 64, 32, 32), (256, 256, 8, 8), (4096, 1024)]
QUICK_SHAPES = [(16, 8, 4, 4), (64, 32)]
COMPILED_SHAPES = [(256, 64, 32, 32), (4096, 1024)]  # inductor compiles take about a minute each here
MICROBATCHES = [None, 4, 2]


def _step(module, x, dy):
    def run():
        x.grad = None
        module.zero_grad(set_to_none=True)
        y = module(x)
        y.backward(dy)
        return x.grad

    return run


def measure_cpu_one_thread(candidates, *, rounds: int, warmup: int) -> dict:
    """Like ``benchmarks.common.measure``, on one thread, timed by that thread's CPU time (seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        times = {name: [] for name in candidates}
        names = list(candidates)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.thread_time()
                candidates[name]()
                times[name].append(time.thread_time() - t0)
        return times
    finally:
        torch.set_num_threads(threads)


def _paired(times, a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def run(args):
    torch.manual_seed(0)
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    sync = (lambda out: out) if on_cpu else (lambda out: torch.cuda.synchronize(device))
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    compiled_shapes = shapes if (args.quick or args.shapes) else COMPILED_SHAPES
    rows, raw = [], {}
    for shape in shapes:
        x = torch.randn(shape, device=device).requires_grad_(True)
        dy = torch.randn(shape, device=device)
        c = shape[1]
        bn_cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
        br_cls = BatchRenorm2d if len(shape) == 4 else BatchRenorm1d
        fshape = (1, c) + (1,) * (len(shape) - 2)
        a, b = torch.full(fshape, 1.5, device=device), torch.full(fshape, 0.5, device=device)
        cands = {"floor: addcmul": lambda a=a, b=b, x=x: torch.addcmul(b, x.detach(), a)}
        modes = ["eager"] + ([] if args.no_compile or shape not in compiled_shapes else ["compiled"])
        for mode in modes:
            wrap = (lambda m: torch.compile(m)) if mode == "compiled" else (lambda m: m)
            cands[f"{mode} BatchNorm"] = _step(wrap(bn_cls(c, device=device)), x, dy)
            for k in MICROBATCHES:
                cands[f"{mode} renorm mb={k}"] = _step(wrap(br_cls(c, microbatch_size=k, device=device)), x, dy)
        times = measure(cands, rounds=args.rounds, warmup=args.warmup, sync=sync)
        summary = summarize(times, baseline="eager BatchNorm", floor="floor: addcmul")
        for mode in modes:  # micro-batches against the whole batch of the same mode
            for k in MICROBATCHES[1:]:
                name = f"{mode} renorm mb={k}"
                summary[name]["vs_whole"] = summarize(
                    {n: times[n] for n in (name, f"{mode} renorm mb=None")}, whole=f"{mode} renorm mb=None"
                )[name]["vs_whole"]
            if mode == "compiled":
                for k in MICROBATCHES:
                    name = f"compiled renorm mb={k}"
                    summary[name]["vs_compiled_bn"] = summarize(
                        {n: times[n] for n in (name, "compiled BatchNorm")}, baseline="compiled BatchNorm"
                    )[name]["vs_baseline"]
        raw[str(shape)] = {"times_s": times, "summary": summary}
        if on_cpu:
            eager = {n: f for n, f in cands.items() if n.startswith("eager ")}
            cpu = measure_cpu_one_thread(eager, rounds=args.rounds, warmup=args.warmup)
            for name in eager:
                summary[name]["cpu1_vs_baseline"] = _paired(cpu, name, "eager BatchNorm")
                if "mb=None" not in name and "mb=" in name:
                    summary[name]["cpu1_vs_whole"] = _paired(cpu, name, "eager renorm mb=None")
            raw[str(shape)]["cpu_one_thread_s"] = cpu
        for name, s in summary.items():
            rows.append({"shape": str(shape), "candidate": name, **s})
            print(
                f"{str(shape):20s} {name:24s} {s['median_ms']:9.2f} ms  spread {s['spread']:.2f}  "
                f"x{s['vs_baseline']:.3f} of eager BN"
                + (f"  x{s['vs_whole']:.2f} of whole batch" if "vs_whole" in s else ""),
                flush=True,
            )
    table = markdown_table(
        rows,
        [
            "shape",
            "candidate",
            "median_ms",
            "spread",
            "vs_baseline",
            "vs_compiled_bn",
            "vs_whole",
            "vs_floor",
            "cpu1_vs_baseline",
            "cpu1_vs_whole",
        ],
    )
    print(table)
    write_results(
        args.out,
        {
            "suite": "layers_torch",
            "machine": machine_info(),
            "device": str(device) if on_cpu else f"{device} ({torch.cuda.get_device_name(device)})",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "rows": rows,
            "raw": raw,
            "table": table,
        },
        args,
    )


def _extra(p):
    p.add_argument("--no-compile", action="store_true", help="eager candidates only (a partial run)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N; a GPU run has results of its own")


RESULTS = "benchmarks/results/layers_torch.json"
GPU_RESULTS = device_results(RESULTS, "gpu")


def parse(argv=None):
    """``benchmarks.common.parse_args``, with ``--no-compile`` a partial run too (it never writes the committed
    results), and ``--device``: a GPU's full run writes :data:`GPU_RESULTS`, never :data:`RESULTS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    device = parse_args(__doc__.splitlines()[0], RESULTS, argv, extra=_extra).device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"layers_torch: --device must be cpu, cuda or cuda:N, got --device {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"layers_torch: --device {device}: this PyTorch sees no CUDA device")
    results = RESULTS if kind == "cpu" else GPU_RESULTS
    args = parse_args(__doc__.splitlines()[0], results, argv, extra=_extra)
    if args.no_compile and args.full:
        args.full = False
        if os.path.abspath(args.out) == os.path.abspath(results):
            args.out = scratch_path(results)
    return args


if __name__ == "__main__":
    run(parse())
