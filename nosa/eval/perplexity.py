"""Held-out perplexity, overall and by token position (how well the model uses longer context)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nosa.data.packing import CorpusRows


@torch.no_grad()
def perplexity_by_position(model, rows: CorpusRows, num_rows: int, batch_size: int, num_buckets: int,
                           device, autocast=None) -> dict:
    """NLL of every predicted token of the first `num_rows` rows (packed held-out text, `rows.seq_len`
    tokens each), averaged overall and in `num_buckets` equal position buckets.

    A token at position p (0-based within its row) was predicted from p tokens of context; buckets are
    over p in [1, L). Returns nats per token and perplexity = exp(nll); with the byte tokenizer a token
    is a byte, so bits per byte = nll / ln 2.
    """
    if num_rows < 1 or batch_size < 1 or num_buckets < 1:
        raise ValueError("num_rows, batch_size and num_buckets must be >= 1")
    length = rows.seq_len
    if num_buckets > length - 1:
        raise ValueError(f"num_buckets ({num_buckets}) must be <= seq_len - 1 ({length - 1})")
    used = min(num_rows, len(rows))
    nll_sum = torch.zeros(length - 1, dtype=torch.float64)
    count = torch.zeros(length - 1, dtype=torch.float64)
    model.eval()
    for start in range(0, used, batch_size):
        batch = [rows.row(j) for j in range(start, min(start + batch_size, used))]
        ids = torch.stack([torch.from_numpy(b[0]) for b in batch]).to(device)
        labels = torch.stack([torch.from_numpy(b[1]) for b in batch]).to(device)
        with autocast if autocast is not None else torch.autocast(device_type="cpu", enabled=False):
            logits = model(input_ids=ids, use_cache=False).logits
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none")
        valid = (targets != -100).double()
        nll_sum += (nll.double() * valid).sum(0).cpu()
        count += valid.sum(0).cpu()
    edges = [1 + round(i * (length - 1) / num_buckets) for i in range(num_buckets + 1)]
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        s, c = float(nll_sum[lo - 1 : hi - 1].sum()), float(count[lo - 1 : hi - 1].sum())
        nll = s / c if c else float("nan")
        buckets.append({"start": lo, "end": hi, "tokens": int(c), "nll": nll, "ppl": math.exp(nll) if c else float("nan")})
    total = float(nll_sum.sum() / count.sum().clamp(min=1))
    return {
        "seq_len": length,
        "rows_requested": num_rows,
        "rows_used": used,
        "tokens": int(count.sum()),
        "nll": total,
        "ppl": math.exp(total),
        "bits_per_token": total / math.log(2),
        "buckets": buckets,
    }
