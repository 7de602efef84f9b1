"""The engine's accuracy figures: each rule with the CLI's defaults on real MNIST, 3 epochs, seed 0,
full test set, on the chosen backends. Runs the CLI itself and prints one JSON object.

    python bench/figures.py [--backends numpy,tensorflow] [--rules bp,dtp,rlstp,lstp] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TARGETS = {"bp": 0.97, "dtp": 0.95, "rlstp": 0.90, "lstp": 0.85}


def run(rule: str, backend: str, epochs: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "tp_engine.train", "--rule", rule, "--backend", backend,
           "--dataset", "mnist", "--epochs", str(epochs), "--seed", str(seed), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        return {"rule": rule, "backend": backend, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="numpy")
    p.add_argument("--rules", default="bp,dtp,rlstp,lstp")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table on stderr")
    args = p.parse_args(argv)
    results = []
    for backend in args.backends.split(","):
        for rule in args.rules.split(","):
            r = run(rule, backend, args.epochs, args.seed)
            r["target_test_accuracy"] = TARGETS.get(rule)
            r["meets_target"] = r.get("test_accuracy") is not None and r["test_accuracy"] >= TARGETS.get(rule, 0)
            results.append(r)
            print(json.dumps({k: r.get(k) for k in ("rule", "backend", "test_accuracy", "valid_accuracy", "seconds_per_epoch", "meets_target")}), file=sys.stderr, flush=True)
    print(json.dumps({"epochs": args.epochs, "seed": args.seed, "results": results}))
    if args.markdown:
        lines = ["| rule | backend | test accuracy | target | valid accuracy | s/epoch | mean angle to bp (°) |", "|---|---|---|---|---|---|---|"]
        for r in results:
            ang = r.get("angle_bp") or {}
            mean_ang = sum(ang.values()) / len(ang) if ang else float("nan")
            lines.append(f"| `{r['rule']}` | {r['backend']} | {r.get('test_accuracy', float('nan')):.4f} | {r['target_test_accuracy']:.2f} | "
                         f"{r.get('valid_accuracy', float('nan')):.4f} | {r.get('seconds_per_epoch', float('nan')):.1f} | {mean_ang:.1f} |")
        print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
