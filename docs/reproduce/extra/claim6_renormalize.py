"""Claim 6 side check: how much of the MoE's extra last-layer variance comes from
renormalising the top-k router weights?

Trains the tiny reproduce plan's dense base and three MoEs of equal active size (default
top-k renormalisation; no renormalisation, as in OLMoE; no renormalisation plus a shared
expert), two seeds each, and prints the diagnose metrics. About 3 min on 2 CPU cores:

    .venv/bin/python docs/reproduce/extra/claim6_renormalize.py [tiny|small] [SEEDS] [OUT] [VARIANTS]

VARIANTS is a comma-separated subset of the names below (default: all four). At small
scale the dense and moe_renorm runs are the same configs as `reproduce --scale small`'s
claim 6, so those numbers can be read from its report instead of training them again.
"""

import sys
from pathlib import Path

from depthlab.experiments.reproduce import moe_overrides, plan_for
from depthlab.experiments.study import Point, make_sweep, run_study

scale = sys.argv[1] if len(sys.argv) > 1 else "tiny"
seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
out = Path(sys.argv[3] if len(sys.argv) > 3 else f"runs/claim6_renormalize_{scale}")

plan = plan_for(scale)
moe = moe_overrides(plan)["model.moe"]  # the reproduce plan's claim-6 MoE
variants = {
    "dense": {},
    "moe_renorm": {"model.moe": {**moe, "renormalize": True}},
    "moe_norenorm": {"model.moe": {**moe, "renormalize": False}},
    "moe_norenorm_shared": {"model.moe": {**moe, "renormalize": False, "shared_expert": True}},
}
chosen = sys.argv[4].split(",") if len(sys.argv) > 4 else list(variants)
unknown = sorted(set(chosen) - set(variants))
if unknown:
    sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(variants)}")
points = [Point(f"{name}_s{s}", {**variants[name], "train.seed": s})
          for name in chosen for s in range(seeds)]
results = run_study(make_sweep("claim6_renormalize", plan.base, points, out), jobs=2,
                    settings=plan.diagnose)
for name, m in sorted(results.items()):
    print(f"{name:24s} val PPL {m.val_ppl:.3f}  last-layer var {m.last_layer_variance:8.3f}  "
          f"usefulness {m.usefulness:.3f}")
