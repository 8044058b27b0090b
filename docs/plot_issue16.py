"""Issue 16's accuracy frontier: every recipe measured on the H200 with 3 or more seeds (docs/data/issue16_h200_set4-11.json),
its mean dev drop against the dense fine-tune at 1x against that at 4.8x, with the issue's bounds.

    python docs/plot_issue16.py   # writes docs/img/issue16_frontier.png and prints the points
"""
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent
DENSE_DEV = 83.17  # the dense fine-tune's mean dev accuracy (docs/results.md)


def points():
    out = []
    for n in range(4, 12):
        data = json.loads((DOCS / "data" / f"issue16_h200_set{n}.json").read_text())
        runs = data["runs"] if isinstance(data, dict) else data
        by = {}
        for r in runs:
            by.setdefault(r["recipe"], []).append(r)
        for recipe, rs in by.items():
            if len(rs) < 3:
                continue
            if rs[0].get("key", "").startswith(("dense", "d1b", "d2b", "f48")):
                continue  # set 10's dense stages (half a recipe) and 4.8x-only probes (no 1x model)
            epochs = max(r.get("epochs") or len(r.get("train_s_per_epoch") or []) for r in rs)
            drop = {s: DENSE_DEV - statistics.mean(r["dev"][s] for r in rs) for s in ("1", "2", "3", "4.8")}
            out.append({"set": n, "recipe": recipe, "seeds": len(rs), "epochs": epochs, **drop})
    return out


def main():
    pts = points()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ax.fill_between([-1, 0.5], -1, 2.5, color="tab:green", alpha=0.15, label="issue 16's 1x and 4.8x bounds")
    for p in pts:
        short = p["epochs"] <= 5
        color = {9: "tab:red", 10: "tab:purple", 11: "tab:orange"}.get(p["set"], "tab:blue") if short else "tab:gray"
        ax.scatter(p["1"], p["4.8"], s=18 + 6 * p["seeds"], marker="o" if short else "s", color=color, alpha=0.8)
        if p["set"] >= 8:
            ax.annotate(p["recipe"], (p["1"], p["4.8"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter([], [], marker="o", color="tab:blue", label="4-5 epochs (fits the 15-minute CPU budget)")
    ax.scatter([], [], marker="o", color="tab:red", label="4 epochs, seventh set (averages, layer rates, frozen embeddings)")
    ax.scatter([], [], marker="o", color="tab:purple", label="4-5 epochs from a dense fine-tune (eighth set)")
    ax.scatter([], [], marker="o", color="tab:orange", label="4 epochs, dropped rows fused or not (ninth set)")
    ax.scatter([], [], marker="s", color="tab:gray", label="8-10 epochs (about 2x the budget)")
    ax.set(xlabel="dev drop at 1x (points under the dense fine-tune)", ylabel="dev drop at 4.8x",
           title="MiniLM-L6 on rt_polarity, H200, 3-9 seeds per recipe", xlim=(-0.5, 2.5), ylim=(1.5, 5.5))
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "img" / "issue16_frontier.png", dpi=120)
    for p in sorted(pts, key=lambda p: (p["set"], p["recipe"])):
        print(f"set {p['set']} {p['recipe']:28s} n={p['seeds']} e={p['epochs']:2d}  "
              + " / ".join(f"{p[s]:.2f}" for s in ("1", "2", "3", "4.8")))


if __name__ == "__main__":
    main()
