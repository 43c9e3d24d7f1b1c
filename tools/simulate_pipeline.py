"""Print the DeepSeek-V3 pipeline table (1F1B, ZB1P, DualPipe, DualPipeV: bubble, parameters
and activations per device) from the schedule simulator next to the closed-form formulas.

    python tools/simulate_pipeline.py [--pp 4 8 16] [--F 1 --B 2 --W 1 --FB 3] [--comm 0]
                                      [--mb-per-pp 2] [--p2p async|wait-all|wait-recv]

Costs are in the table's notation: B is the *full* backward (inputs + weights) of one stage for
one micro-batch, W its weight part, F&B a forward and a full backward run as one overlapped pair.
The simulator's input-backward op therefore costs B - W. PP is the number of stages; DualPipeV
runs them on PP/2 devices.

Measured columns come from running the op lists in `parallel.pipeline` through the simulator:
bubble = makespan - busy time of a device (all devices start at t = 0), shown as the worst device
(and the best one when devices differ); parameters = fraction of the model's parameters on a
device x PP; activations = peak (micro-batch, stage) activations alive on a device, an activation
being alive from its F until its weight gradient (W) is done. Nothing is fitted to the formulas.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel.pipeline import Costs, build_schedule, simulate  # noqa: E402

METHODS = (("1F1B", "1f1b"), ("ZB1P", "zbh1"), ("DualPipe", "dualpipe"), ("DualPipeV", "dualpipev"))


def formulas(method: str, pp: int, F: float, B: float, W: float, FB: float):
    """(bubble, parameter multiple, activations) from the DeepSeek table; B = full backward."""
    return {
        "1F1B": ((pp - 1) * (F + B), 1, pp),
        "ZB1P": ((pp - 1) * (F + B - 2 * W), 1, pp),
        "DualPipe": ((pp / 2 - 1) * (FB + B - 3 * W), 2, pp + 1),
        "DualPipeV": ((pp / 2 - 1) * (FB + B - 3 * W), 2, pp + 1),
    }[method]


def measure(method: str, pp: int, n: int, costs: Costs, p2p: str):
    name = dict(METHODS)[method]
    ranks = pp // 2 if name == "dualpipev" else pp
    sched = build_schedule(name, ranks, n)
    res = simulate(sched, costs, p2p=p2p)
    params = max(sched.param_fraction(r) for r in range(ranks)) * pp
    return ranks, res, params


def fmt(x: float) -> str:
    return f"{x:g}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[4, 8, 16], help="pipeline stages (even)")
    ap.add_argument("--F", type=float, default=1.0, help="forward of one stage")
    ap.add_argument("--B", type=float, default=2.0, help="full backward (inputs + weights)")
    ap.add_argument("--W", type=float, default=1.0, help="weight part of the backward")
    ap.add_argument("--FB", type=float, default=None, help="overlapped forward + full backward pair "
                    "(default F + B: the overlap hides communication, not compute)")
    ap.add_argument("--comm", type=float, default=0.0, help="point-to-point latency between ranks")
    ap.add_argument("--mb-per-pp", type=int, default=2, help="micro-batches = this x PP (DualPipe needs >= 2)")
    ap.add_argument("--p2p", default="async", choices=["async", "wait-all", "wait-recv"],
                    help="how sends/receives block (see parallel/pipeline/simulator.py)")
    args = ap.parse_args(argv)
    F, B, W = args.F, args.B, args.W
    FB = F + B if args.FB is None else args.FB
    if not 0 <= W <= B:
        ap.error("--W must be between 0 and --B (W is part of the full backward).")
    costs = Costs(F=F, B=B - W, W=W, FB=FB, comm=args.comm)

    print("Pipeline bubbles and memory per device, simulated vs DeepSeek-V3 formulas")
    print(f"costs: F={fmt(F)}  B={fmt(B)} (full backward = input part {fmt(B - W)} + W)  W={fmt(W)}  "
          f"F&B={fmt(FB)}  comm={fmt(args.comm)}  p2p={args.p2p}  micro-batches={args.mb_per_pp}xPP")
    head = (f"{'method':<10} {'PP':>3} {'dev':>4} {'N':>4} | {'bubble sim':>13} {'formula':>8} | "
            f"{'params sim':>10} {'formula':>7} | {'activ sim':>9} {'formula':>7}")
    print(head)
    print("-" * len(head))
    mismatches = []
    for pp in args.pp:
        n = args.mb_per_pp * pp
        for method, _ in METHODS:
            f_bub, f_par, f_act = formulas(method, pp, F, B, W, FB)
            try:
                ranks, res, params = measure(method, pp, n, costs, args.p2p)
            except ValueError as e:
                print(f"{method:<10} {pp:>3}  -- {e}")
                continue
            lo, hi = min(res.bubble), max(res.bubble)
            bub = fmt(hi) if abs(hi - lo) < 1e-9 else f"{fmt(lo)}..{fmt(hi)}"
            act_lo, act_hi = min(res.peak_activations), max(res.peak_activations)
            act = str(act_hi) if act_lo == act_hi else f"{act_lo}..{act_hi}"
            print(f"{method:<10} {pp:>3} {ranks:>4} {n:>4} | {bub:>13} {fmt(f_bub):>8} | "
                  f"{fmt(params) + 'x':>10} {str(f_par) + 'x':>7} | {act:>9} {f_act:>7}")
            if abs(hi - f_bub) > 1e-9:
                mismatches.append(f"{method} PP={pp}: bubble {fmt(hi)} (worst device) vs formula {fmt(f_bub)}")
            if abs(params - f_par) > 1e-9 or act_hi != f_act:
                mismatches.append(f"{method} PP={pp}: params {fmt(params)}x / activations {act_hi} vs "
                                  f"{f_par}x / {f_act}")

    print()
    print("Notes")
    print("- bubble: makespan minus the device's compute time, all devices starting at t=0; a range is")
    print("  best..worst device. Activations: units of one stage's activations for one micro-batch; an")
    print("  activation counts until its W is done (W needs the stored inputs), so ZB1P's deferred W's")
    print("  and DualPipe's F&B pair (a forward allocating while a backward still holds its own) count.")
    print("- 1F1B activations are PP - rank (the table gives the worst device, rank 0); ZB1P keeps PP")
    print("  in flight on every device; DualPipe/DualPipeV PP+1 on every device.")
    if mismatches:
        print("- measured != formula here:")
        for m in mismatches:
            print(f"    {m}")
    else:
        print("- every measured value equals its formula at these costs (bubble: worst device).")
    print("- The formulas are exact only in part of the cost space; this simulator does not assume them:")
    _sensitivity(args.mb_per_pp, args.p2p)
    print("  Why: the formulas count the idle cells of DeepSeek's figure, drawn with forward, input-backward")
    print("  (B-W) and W chunks of equal length. ZB1P: the simulator gives (PP-1) max(F+(B-W)-W, F, B-W)")
    print("  for any costs, so the formula needs W <= F and W <= B-W; otherwise a chain of PP-1 forwards")
    print("  (the last device's start-up) or of PP-1 input-backwards (the last gradient's way back to")
    print("  device 0, which defers no W) cannot be filled. DualPipe/DualPipeV: exact whenever F = B-W,")
    print("  W <= F and B <= F&B <= F+B (checked on random costs in the tests). A longer input backward")
    print("  leaves a shorter tail than counted (measured below the formula by a constant); a longer")
    print("  forward lengthens the warm-up (the gap grows with PP); with F&B < B a fused pair outruns")
    print("  the data it waits for. When F&B < F+B the devices differ: a device fuses more pairs the")
    print("  farther it sits from its end of the pipeline, so the middle devices compute least and idle")
    print("  most; the formula is that worst device.")
    print("- p2p modes, F=1 B=2 W=1 F&B=3, PP=8 (worst-device bubble, async / wait-all / wait-recv):")
    _p2p_modes(args.mb_per_pp)
    print("  wait-all (batch_isend_irecv, wait on every request, as DeepSeek's DualPipe) costs ZB1P its")
    print("  gain: a device that finished B blocks in its send until the receiver posts the matching")
    print("  receive, instead of running a deferred W. An executor should wait for receives only")
    print("  (wait-recv) and collect send requests at the end of the step.")


def _sensitivity(mb_per_pp: int, p2p: str) -> None:
    cases = [  # (F, B full, W, F&B)
        (1, 2, 1, 3), (1, 2, 1, 2.5), (1, 2, 1, 2), (1, 2, 1, 1.5),
        (1, 3, 1, 4), (2, 2, 1, 4), (2, 3, 1, 5), (1, 3, 2, 4), (1, 1.5, 0.5, 2.5),
    ]
    pps = (4, 8, 16)
    print(f"    {'F':>4} {'B':>4} {'W':>4} {'F&B':>4} | " +
          " | ".join(f"{'ZB1P PP=' + str(pp):>17}" for pp in pps[1:2]) + " | " +
          " | ".join(f"{'DualPipe PP=' + str(pp):>17}" for pp in pps) + "   (sim/formula)")
    for F, B, W, FB in cases:
        costs = Costs(F=F, B=B - W, W=W, FB=FB)
        cells = []
        for method, pplist in (("ZB1P", pps[1:2]), ("DualPipe", pps)):
            for pp in pplist:
                _, res, _ = measure(method, pp, mb_per_pp * pp, costs, p2p)
                f_bub = formulas(method, pp, F, B, W, FB)[0]
                lo, hi = min(res.bubble), max(res.bubble)
                sim = fmt(hi) if abs(hi - lo) < 1e-9 else f"{fmt(lo)}..{fmt(hi)}"
                mark = "" if abs(hi - f_bub) < 1e-9 else " *"
                cells.append(f"{sim + '/' + fmt(f_bub) + mark:>17}")
        print(f"    {fmt(F):>4} {fmt(B):>4} {fmt(W):>4} {fmt(FB):>4} | " + " | ".join(cells))
    print("    (* = worst device differs from the formula)")


def _p2p_modes(mb_per_pp: int) -> None:
    for comm in (0.0, 0.1):
        cells = []
        for method, _ in METHODS:
            vals = [max(measure(method, 8, mb_per_pp * 8, Costs(1, 1, 1, 3, comm), m)[1].bubble)
                    for m in ("async", "wait-all", "wait-recv")]
            cells.append(f"{method} " + "/".join(fmt(round(v, 3)) for v in vals))
        print(f"    comm={fmt(comm)}: " + "   ".join(cells))


if __name__ == "__main__":
    main()
