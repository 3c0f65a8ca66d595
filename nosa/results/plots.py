"""Plots of training metrics and eval results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training(metrics_path: str, out_path: str) -> str:
    """Training loss (and val loss when logged) and tokens/s against the step."""
    records = [r for r in read_jsonl(metrics_path) if "loss" in r and "event" not in r]
    if not records:
        raise ValueError(f"{metrics_path} holds no step records to plot")
    plt = _pyplot()
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss (all labels)", alpha=0.6)
    corpus = [r for r in records if "corpus" in r.get("loss_by_source", {})]
    if corpus and any(set(r.get("loss_by_source", {})) - {"corpus"} for r in records):  # a mixture: show corpus alone
        ax_loss.plot([r["step"] for r in corpus], [r["loss_by_source"]["corpus"] for r in corpus], label="train loss (corpus rows)")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss (corpus)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_speed.plot([r["step"] for r in records], [r["tokens_per_s"] for r in records])
    ax_speed.set_xlabel("step")
    ax_speed.set_ylabel("tokens / s")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_eval(results: dict, out_path: str) -> str:
    """Perplexity by position bucket, task accuracy by length and depth, locality overlap per layer."""
    panels = [k for k in ("perplexity", "tasks", "locality") if results.get(k)]
    if not panels:
        raise ValueError("no eval results to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        data = results[panel]
        if panel == "perplexity":
            buckets = data["buckets"]
            ax.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["nll"] for b in buckets], "o-")
            ax.set_xlabel("token position")
            ax.set_ylabel("held-out NLL (nats / token)")
            ax.set_title("loss by position")
        elif panel == "tasks":
            for task, table in data.items():
                by_length = table["by_length"]
                lengths = sorted(by_length, key=int)
                ax.plot([int(n) for n in lengths], [by_length[n]["accuracy"] for n in lengths], "o-", label=task)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title("synthetic tasks")
            ax.legend(fontsize=8)
        else:
            layers = data["per_layer"]
            ax.bar([str(r["layer"]) for r in layers], [r["overlap_mean"] for r in layers], label="mean overlap")
            ax.plot([str(r["layer"]) for r in layers], [r["overlap_min"] for r in layers], "kv", label="min overlap")
            if data.get("overlap_bound") is not None:
                k = data["topk_blocks"]
                ax.axhline(data["overlap_bound"], color="r", ls="--", label="bound inside a block: (k-q)/k")
                ax.axhline(data["overlap_bound"] - 1 / k, color="r", ls=":", label="bound at a block boundary: (k-q-1)/k")
            ax.set_xlabel("layer")
            ax.set_ylabel("overlap of consecutive selections")
            ax.set_ylim(0, 1.05)
            ax.set_title("decode locality")
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
