"""Server strategies end to end on digits: a real daemon, a job per strategy, the device simulator.

``python -m bench.strategies`` runs every scenario below and prints, for each, the rounds (model
versions) it took to reach the target accuracy, the best accuracy, the wall time and, for differential
privacy, the epsilon spent. ``--only NAME[,NAME]`` picks scenarios; ``--rounds`` shortens them.

Scenarios (all on scikit-learn's digits, 100 simulated devices, non-IID Dirichlet(0.5) shards, the MLP):
- fed-avg, fed-yogi, fed-adam, fed-adagrad, fed-avgm, q-fedavg, fed-prox, async (FedBuff);
- dp: fed-avg with clip_norm and noise_multiplier (accuracy and (epsilon, delta) reported);
- poison-*: 20 % of the devices upload hostile updates; fed-avg against trimmed_mean and krum;
- oort / random under devices of mixed speed: the wall time to the target.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Daemon, workdir

BASE = """\
job_conf:
  - job_name: {name}
  - model: mlp
  - input_shape: 8 8 1
  - num_classes: 10
  - rounds: {rounds}
  - num_participants: 10
  - overcommitment: 1.3
  - test_participants: 40
  - eval_interval: {eval_interval}
  - learning_rate: 0.1
  - min_learning_rate: 0.001
  - local_steps: 20
  - batch_size: 16
  - test_bsz: 32
  - filter_less: 1
  - round_deadline: 30
  - selection_window: 1
  - checkin_wait: 10
  - retry_min: 0.2
  - retry_max: 2
"""
ASYNC_HEADER = "aggregator_entry: fedscale/cloud/aggregation/async_aggregator.py\n"


@dataclass
class Scenario:
    """One job and how the simulator drives it."""

    name: str
    keys: dict[str, Any] = field(default_factory=dict)
    sim: list[str] = field(default_factory=list)
    asynchronous: bool = False
    target: float = 0.85
    rounds: int = 0  # 0: the --rounds given


SCENARIOS = [
    Scenario("fed-avg"),
    Scenario("fed-yogi", {"gradient_policy": "fed-yogi", "yogi_eta": 0.01}),
    Scenario("fed-adam", {"gradient_policy": "fed-adam", "server_lr": 0.01}),
    Scenario("fed-adagrad", {"gradient_policy": "fed-adagrad", "server_lr": 0.03}),
    Scenario("fed-avgm", {"gradient_policy": "fed-avgm", "server_lr": 0.5, "server_momentum": 0.5}),
    Scenario("q-fedavg", {"gradient_policy": "q-fedavg", "qfed_q": 1.0}, rounds=150),
    Scenario("q-fedavg-q0.2", {"gradient_policy": "q-fedavg", "qfed_q": 0.2}, rounds=80),
    Scenario("fed-prox", {"gradient_policy": "fed-prox", "proxy_mu": 0.01}),
    Scenario("async", {"max_staleness": 5, "max_concurrency": 20}, asynchronous=True),
    Scenario("dp", {"clip_norm": 2.0, "noise_multiplier": 0.5, "weighting": "uniform", "num_participants": 30,
                    "overcommitment": 1.0}, target=0.80),
    Scenario("dp-z1", {"clip_norm": 2.0, "noise_multiplier": 1.0, "weighting": "uniform", "num_participants": 30,
                       "overcommitment": 1.0}, target=0.80),
    Scenario("poison-fed-avg", sim=["--hostile", "0.2"], target=0.80),
    Scenario("poison-trimmed_mean", {"aggregator": "trimmed_mean", "trim_fraction": 0.3}, sim=["--hostile", "0.2"],
             target=0.80),
    Scenario("poison-krum", {"aggregator": "krum", "krum_f": 3, "num_participants": 15, "min_participants": 10},
             sim=["--hostile", "0.2"], target=0.80, rounds=60),
    Scenario("speed-random", {"round_deadline": 20, "eval_interval": 2},
             sim=["--slow-devices", "0.5", "--slow-seconds", "3", "6"], target=0.90),
    Scenario("speed-oort", {"sample_mode": "oort", "round_deadline": 20, "eval_interval": 2},
             sim=["--slow-devices", "0.5", "--slow-seconds", "3", "6"], target=0.90),
]


def job_text(scenario: Scenario, rounds: int, eval_interval: int) -> str:
    """The scenario's job file."""
    name = "s-" + scenario.name.replace("_", "-")
    text = BASE.format(name=name, rounds=rounds, eval_interval=eval_interval)
    lines = text.splitlines()
    for key, value in scenario.keys.items():
        lines = [line for line in lines if not line.startswith(f"  - {key}:")]
        lines.append(f"  - {key}: {value}")
    body = "\n".join(lines) + "\n"
    return (ASYNC_HEADER + body) if scenario.asynchronous else body


def run(scenario: Scenario, rounds: int, eval_interval: int, seed: int, max_seconds: int) -> dict[str, Any]:
    """Run one scenario on a fresh daemon; its figures."""
    with workdir(f"strategy-{scenario.name}-") as work, Daemon(work) as daemon:
        status = daemon.submit(job_text(scenario, rounds, eval_interval))
        job = status["name"]
        began = time.monotonic()
        sim = subprocess.run(
            [sys.executable, "-m", "fedscaled.device.cli", "simulate", "--server", daemon.url, "--job", job,
             f"--token={status['enrollment_token']}", "--devices", "100", "--dataset", "digits", "--alpha", "0.5",
             "--seed", str(seed), "--max-seconds", str(max_seconds), "--json", *scenario.sim],
            capture_output=True, text=True, timeout=max_seconds + 120, check=False)
        wall = time.monotonic() - began
        status = daemon.status(job)
    accuracy = {m["model_version"]: m["test_accuracy"] for m in status["metrics"] if m.get("test_accuracy") is not None}
    reached = [(v, acc) for v, acc in sorted(accuracy.items()) if acc >= scenario.target]
    first = reached[0][0] if reached else None
    # Time to the target: the training rounds' own durations (open to close) up to the version that reached it.
    durations = {int(m["model_version"]): float(m["duration"] or 0.0) for m in status["metrics"]}
    to_target = round(sum(d for v, d in durations.items() if first is not None and v <= first), 1) if first else None
    ordered = sorted(durations.values())
    median_round = round(ordered[len(ordered) // 2], 2) if ordered else None
    privacy = status.get("privacy")
    return {"scenario": scenario.name, "state": status["state"], "rounds_run": status["model_version"],
            "target": scenario.target, "rounds_to_target": first, "best_accuracy": max(accuracy.values(), default=None),
            "final_accuracy": accuracy.get(status["model_version"]), "wall_seconds": round(wall, 1),
            "epsilon": privacy["epsilon"] if privacy else None, "delta": privacy["delta"] if privacy else None,
            "seconds_to_target": to_target, "median_round_seconds": median_round,
            "round_seconds": [round(durations[v], 2) for v in sorted(durations)],
            "simulator_rc": sim.returncode, "accuracy_by_version": accuracy,
            "error": None if sim.returncode == 0 else (sim.stdout + sim.stderr)[-800:]}


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and print a table (and JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m bench.strategies", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--rounds", type=int, default=40, help="rounds (model versions) per job (40)")
    parser.add_argument("--eval-interval", type=int, default=5, help="evaluate every this many versions (5)")
    parser.add_argument("--seed", type=int, default=7, help="simulator seed (7)")
    parser.add_argument("--max-seconds", type=int, default=900, help="longest simulator run per scenario (900)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    if not chosen:
        parser.error(f"no scenario named {args.only!r}; known: {', '.join(s.name for s in SCENARIOS)}")
    results = []
    print(f"{'scenario':22} {'state':9} {'target':>6} {'to target':>9} {'best':>6} {'final':>6} {'wall s':>7} "
          f"{'s to target':>11} {'round s':>7} epsilon")
    for scenario in chosen:
        result = run(scenario, scenario.rounds or args.rounds, args.eval_interval, args.seed, args.max_seconds)
        results.append(result)
        best = f"{result['best_accuracy']:.3f}" if result["best_accuracy"] is not None else "-"
        final = f"{result['final_accuracy']:.3f}" if result["final_accuracy"] is not None else "-"
        eps = f"{result['epsilon']:.2f} (delta {result['delta']:g})" if result["epsilon"] is not None else ""
        print(f"{scenario.name:22} {result['state']:9} {scenario.target:6.2f} {result['rounds_to_target']!s:>9} "
              f"{best:>6} {final:>6} {result['wall_seconds']:7.1f} {result['seconds_to_target']!s:>11} "
              f"{result['median_round_seconds']!s:>7} {eps}", flush=True)
        if result["error"]:
            print("   simulator:", result["error"].replace("\n", "\n   "))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
