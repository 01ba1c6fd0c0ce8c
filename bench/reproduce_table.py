"""Summarise one or more `upcycle run` outputs (one per random seed) as docs/results.md's table.

For every model of the pipeline: held-out perplexity per domain and pooled over all domains
(exp of the token-weighted mean NLL), mean over the runs with the spread (min–max) of the pooled
figure, the training FLOPs under the pipeline's compute-matched convention, and the finetune's
throughput (tokens/s of the last logged step). Then each claim of methods.md §8 that the
pipeline can test, decided on the pooled perplexity, with how many of the runs agree.

Usage: python bench/reproduce_table.py RUN_DIR [RUN_DIR ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

# (claim, methods.md §8 row, better model, worse model)
CLAIMS = [
    ("upcycling beats dense continued training (sparse upcycling, TS top-2)", 1, "sparse", "dense"),
    ("upcycling beats dense continued training (NVIDIA recipe)", 1, "nvidia", "dense"),
    ("BTX beats sparse upcycling at equal compute", 3, "btx", "sparse"),
    ("BTX beats BTM", 4, "btx", "btm"),
    ("BAM (expert-KV, soft attention routing) beats BTX", 5, "bam-expert-kv", "btx"),
    ("BAM expert-KV beats shared-KV", 6, "bam-expert-kv", "bam-shared-kv"),
    ("soft attention routing beats top-2", 7, "bam-expert-kv", "bam-top2-attention"),
    ("ST + weight scaling (NVIDIA) beats TS (sparse)", 9, "nvidia", "sparse"),
]


def pooled(domains: dict) -> float:
    nll = sum(d["nll_sum"] for d in domains.values())
    tokens = sum(d["tokens"] for d in domains.values())
    return math.exp(nll / tokens)


def last_throughput(metrics: Path) -> float | None:
    if not metrics.is_file():
        return None
    rate = None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train" and record.get("tokens_per_s"):
            rate = record["tokens_per_s"]
    return rate


def load_run(folder: Path) -> dict:
    evaluation = json.loads((folder / "eval" / "eval.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    run = {"domains": sorted(evaluation["domains"]), "models": {}, "summary": summary}
    for name, result in evaluation["models"].items():
        run["models"][name] = {
            "domains": {d: v["perplexity"] for d, v in result["domains"].items()},
            "all": pooled(result["domains"]),
            "tokens_per_s": last_throughput(folder / "finetune" / name / "metrics.jsonl"),
        }
    return run


def training_flops(name: str, summary: dict) -> float | None:
    finetune = summary["finetune_flops"].get(name)
    if finetune is None:
        return summary["branch_flops"] if name == "btm" else None
    branched = name.startswith(("btx", "bam"))
    return finetune + (summary["branch_flops"] if branched else 0.0)


def table(runs: list[dict]) -> str:
    domains = runs[0]["domains"]
    names = list(runs[0]["models"])
    head = ["model", *domains, "all (mean)", "all (min–max)", "training FLOPs", "finetune tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        per_run = [r["models"][name] for r in runs if name in r["models"]]
        cells = [name]
        cells += [f"{statistics.mean(m['domains'][d] for m in per_run):.2f}" for d in domains]
        alls = [m["all"] for m in per_run]
        cells.append(f"{statistics.mean(alls):.2f}")
        cells.append(f"{min(alls):.2f}–{max(alls):.2f}")
        flops = training_flops(name, runs[0]["summary"])
        cells.append("—" if flops is None else f"{flops:.3g}")
        rates = [m["tokens_per_s"] for m in per_run if m["tokens_per_s"]]
        cells.append(f"{statistics.mean(rates):,.0f}" if rates else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(runs: list[dict]) -> str:
    lines = ["| claim (methods.md §8 row) | better | worse | all ppl (mean) | held in runs | verdict |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for text, row, better, worse in CLAIMS:
        pairs = [
            (r["models"][better]["all"], r["models"][worse]["all"])
            for r in runs
            if better in r["models"] and worse in r["models"]
        ]
        if not pairs:
            continue
        held = sum(b < w for b, w in pairs)
        mean_b = statistics.mean(b for b, _ in pairs)
        mean_w = statistics.mean(w for _, w in pairs)
        verdict = "held" if held == len(pairs) else "did not hold" if held == 0 else "mixed"
        lines.append(
            f"| {text} ({row}) | {better} | {worse} | {mean_b:.2f} vs {mean_w:.2f} | "
            f"{held} of {len(pairs)} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = [load_run(folder) for folder in args.runs]
    text = (
        f"Runs: {', '.join(str(f) for f in args.runs)}\n\n"
        "Held-out perplexity (lower is better); `all` pools every domain's tokens.\n\n"
        f"{table(runs)}\n\n{claims(runs)}\n"
    )
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
