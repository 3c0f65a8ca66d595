"""The quality study's figures, drawn from its summary rows (matplotlib, Agg backend)."""

from __future__ import annotations

from nosa.results.plots import _pyplot

COLORS = {"dense": "black", "infllmv2": "tab:blue", "dma": "tab:green", "nosa": "tab:red"}


def plot_loss(rows: list[dict], path: str, shared_eval: dict | None = None) -> str:
    """Training loss (all labels and corpus rows) and val loss of every mode against tokens trained; and a
    third panel: retrieval after each shared phase (shared_eval: accuracy of each task at each length, and
    the answer NLL) against the tokens trained by the end of that phase, with the answers' own training
    NLL per task source along the shared phases."""
    plt = _pyplot()
    fig, (ax_all, ax_corpus, ax_ret) = plt.subplots(1, 3, figsize=(18, 4.2))
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
    _retrieval_panel(ax_ret, rows, shared_eval)
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


def _retrieval_panel(ax, rows: list[dict], shared_eval: dict | None) -> None:
    """Accuracy (left axis, solid) and answer NLL (right axis, dashed) of the shared phases' weights; the
    training answer NLL per task source (right axis, faint) over the shared phases."""
    row = next((r for r in rows if r.get("phases")), None)
    ends, acc = [], 0
    for ph in (row or {}).get("phases", []):
        acc += ph["tokens"]
        ends.append(acc / 1e6)
    nll_ax = ax.twinx()
    drawn = False
    if row:
        shared = [p for p in row.get("loss_curve", []) if row["phases"][p["phase"]].get("shared")]
        for source in sorted({s for p in shared for s in (p.get("answer_nll_by_source") or {})}):
            pts = [p for p in shared if source in (p.get("answer_nll_by_source") or {})]
            nll_ax.plot([p["tokens"] / 1e6 for p in pts], [p["answer_nll_by_source"][source] for p in pts], lw=0.8,
                        alpha=0.35, label=f"train answer NLL: {source}")
            drawn = True
    cells: dict = {}
    for entry in (shared_eval or {}).get("phases", []):
        x = ends[entry["phase"]] if entry["phase"] < len(ends) else entry["phase"]
        for task, by_length in entry.get("tasks", {}).items():
            for length, cell in by_length.items():
                cells.setdefault((task, int(length)), []).append((x, cell["accuracy"], cell["answer_nll"]))
    for (task, length), pts in sorted(cells.items()):
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{task}@{length} accuracy")[0]
        nll_ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=line.get_color(), label=f"{task}@{length} answer NLL")
        drawn = True
    nll_ax.axhline(2.302585, color="grey", ls="-.", lw=0.8)  # ln 10: guessing a digit
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("tokens trained (M)  (markers: end of a shared phase)")
    ax.set_ylabel("accuracy (solid)")
    nll_ax.set_ylabel("answer NLL, nats/token (dashed; dash-dot: ln 10)")
    ax.set_title("retrieval after the shared phases" if drawn else "retrieval after the shared phases: not measured")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    more = nll_ax.get_legend_handles_labels()
    if handles[0] or more[0]:
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=6, loc="center left")


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
