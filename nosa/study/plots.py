"""The quality study's figures, drawn from its summary rows (matplotlib, Agg backend)."""

from __future__ import annotations

from nosa.results.plots import _pyplot

COLORS = {"dense": "black", "infllmv2": "tab:blue", "dma": "tab:green", "nosa": "tab:red"}


def plot_loss(rows: list[dict], path: str) -> str:
    """Training loss (all labels and corpus rows) and val loss of every mode against tokens trained."""
    plt = _pyplot()
    fig, (ax_all, ax_corpus) = plt.subplots(1, 2, figsize=(12, 4.2))
    drawn = 0
    for r in rows:
        curve = r.get("loss_curve") or []
        if not curve:
            continue
        c = COLORS.get(r["attn_mode"])
        ax_all.plot([p["tokens"] / 1e6 for p in curve], [p["loss"] for p in curve], color=c, alpha=0.8, label=r["attn_mode"])
        pts = [p for p in curve if p["corpus_loss"] is not None]
        ax_corpus.plot([p["tokens"] / 1e6 for p in pts], [p["corpus_loss"] for p in pts], color=c, alpha=0.5,
                       label=f"{r['attn_mode']} train (corpus rows)")
        val = [p for p in curve if p["val_loss"] is not None]
        ax_corpus.plot([p["tokens"] / 1e6 for p in val], [p["val_loss"] for p in val], "o-", color=c,
                       label=f"{r['attn_mode']} held-out")
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError("no mode has training records to plot")
    bounds = []
    for r in rows:
        acc = 0
        for ph in r.get("phases", [])[:-1]:
            acc += ph["tokens"]
            bounds.append(acc / 1e6)
        break
    for ax, title in ((ax_all, "training loss, all labelled tokens"), (ax_corpus, "corpus loss: train rows and held-out")):
        for b in bounds:
            ax.axvline(b, color="grey", ls=":", lw=1)
        ax.set_xlabel("tokens trained (M)  (dotted: next curriculum phase)")
        ax.set_ylabel("nats / token")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(rows: list[dict], path: str) -> str:
    """Accuracy of every task against context length, one line per mode."""
    tasks = sorted({t for r in rows for t in (r.get("accuracy") or {})})
    if not tasks:
        raise ValueError("no mode has task accuracy to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in rows:
            cells = (r.get("accuracy") or {}).get(task, {})
            if not cells:
                continue
            lengths = sorted(cells, key=int)
            ax.plot([int(n) / 1024 for n in lengths], [cells[n] for n in lengths], "o-",
                    color=COLORS.get(r["attn_mode"]), label=r["attn_mode"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (all answer tokens argmax)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_locality(rows: list[dict], path: str) -> str:
    """Per layer: mean overlap between consecutive steps and newly needed blocks per step, per mode and
    locality length (all prompts pooled)."""
    series = []
    for r in rows:
        for length, loc in sorted((r.get("locality") or {}).items(), key=lambda kv: int(kv[0])):
            layers = loc.get("all_prompts", {}).get("per_layer")
            if layers:
                series.append((r["attn_mode"], int(length), layers))
    if not series:
        raise ValueError("no mode has locality results to plot")
    plt = _pyplot()
    fig, (ax_o, ax_n) = plt.subplots(1, 2, figsize=(12, 4))
    styles = {}
    for mode, length, layers in series:
        ls = styles.setdefault(length, ["-", "--", ":", "-."][len(styles) % 4])
        x = [rec["layer"] for rec in layers]
        label = f"{mode} {length // 1024}K" if length >= 1024 else f"{mode} {length}"
        ax_o.plot(x, [rec["overlap_mean"] for rec in layers], "o" + ls, color=COLORS.get(mode), label=label)
        ax_o.plot(x, [rec["overlap_p5"] for rec in layers], ls, color=COLORS.get(mode), alpha=0.35)
        ax_n.plot(x, [rec["new_blocks_mean"] for rec in layers], "o" + ls, color=COLORS.get(mode), label=label)
        ax_n.plot(x, [rec["new_blocks_p95"] for rec in layers], ls, color=COLORS.get(mode), alpha=0.35)
    ax_o.set_title("overlap γ between consecutive steps (mean; faint: p5)")
    ax_n.set_title("newly needed blocks per (seq, KV head) per step (mean; faint: p95)")
    for ax in (ax_o, ax_n):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
