"""Scratch: how fast does content-based copying form on copy_drill rows (copy-span NLL every N steps)."""
import argparse, json, math, sys, time
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", ".."))  # repo root
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from nosa.data.tasks import generate_task
from nosa.data.tokenization import load_tokenizer

class Rope(nn.Module):
    def __init__(s, dim, theta):
        super().__init__(); s.register_buffer("inv", 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim), persistent=False)
    def forward(s, x):  # x: b h t d
        t = torch.arange(x.shape[2], dtype=torch.float32)
        f = torch.outer(t, s.inv); cos, sin = f.cos(), f.sin()
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)

class Block(nn.Module):
    def __init__(s, d, h, mlp, rope):
        super().__init__(); s.h = h; s.n1 = nn.RMSNorm(d); s.qkv = nn.Linear(d, 3 * d, bias=False); s.o = nn.Linear(d, d, bias=False)
        s.rope = rope; s.mlp = nn.Sequential(nn.RMSNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) if mlp else None
    def forward(s, x):
        b, t, d = x.shape
        q, k, v = s.qkv(s.n1(x)).view(b, t, 3, s.h, d // s.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(s.rope(q), s.rope(k), v, is_causal=True)
        x = x + s.o(y.transpose(1, 2).reshape(b, t, d))
        return x + s.mlp(x) if s.mlp is not None else x

class Own(nn.Module):
    def __init__(s, vocab, d, h, layers, mlp, theta):
        super().__init__(); rope = Rope(d // h, theta)
        s.emb = nn.Embedding(vocab, d); s.blocks = nn.ModuleList(Block(d, h, mlp, rope) for _ in range(layers))
        s.norm = nn.RMSNorm(d); s.head = nn.Linear(d, vocab, bias=False)
        for m in s.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)): nn.init.normal_(m.weight, std=0.02)
    def forward(s, ids):
        x = s.emb(ids)
        for b in s.blocks: x = b(x)
        return s.head(s.norm(x))

def main():
    p = argparse.ArgumentParser()
    a = [("--model", str, "own"), ("--layers", int, 2), ("--hidden", int, 128), ("--heads", int, 4), ("--kv", int, 2),
         ("--mlp", int, 0), ("--theta", float, 1e4), ("--lr", float, 2e-3), ("--warmup", int, 50), ("--batch", int, 32),
         ("--len", int, 128), ("--alphabet", int, 0), ("--span-min", int, 8), ("--span-max", int, 32), ("--cue", int, 3),
         ("--steps", int, 1000), ("--seconds", float, 240), ("--every", int, 50), ("--seed", int, 0), ("--wd", float, 0.1),
         ("--threads", int, 1), ("--tag", str, ""), ("--answer-loss", int, 0), ("--switch", int, 0), ("--len2", int, 256), ("--batch2", int, 16)]
    for n, t, d in a: p.add_argument(n, type=t, default=d)
    g = p.parse_args(); torch.set_num_threads(g.threads); torch.manual_seed(g.seed)
    tok = load_tokenizer("byte")
    prm = dict(alphabet=g.alphabet, span_min=g.span_min, span_max=g.span_max, cue=g.cue)
    if g.model == "own":
        model = Own(tok.vocab_size, g.hidden, g.heads, g.layers, g.mlp, g.theta)
    else:
        from nosa.config import NosaConfig
        from nosa.models import NosaForCausalLM
        cfg = NosaConfig(vocab_size=tok.vocab_size, hidden_size=g.hidden, intermediate_size=g.hidden * 3,
                         num_hidden_layers=g.layers, num_attention_heads=g.heads, num_key_value_heads=g.kv,
                         max_position_embeddings=4096, attn_mode="dense", rope_theta=g.theta, pad_token_id=tok.pad_id,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        m = NosaForCausalLM(cfg).float(); model = lambda ids: m(input_ids=ids, use_cache=False).logits
        model.parameters = m.parameters; model.train = m.train; model.eval = m.eval
    def batch(seed, n, length=None):
        rng = np.random.default_rng(seed); S = [generate_task("copy_drill", tok, rng, length or g.len, 0.5, **prm) for _ in range(n)]
        return torch.tensor([s.input_ids for s in S]), torch.tensor([s.labels() for s in S])
    ev_ids, ev_lab = batch([999, 1], 64)
    ev2 = batch([999, 2], 16, g.len2) if g.switch else None
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, betas=(0.9, 0.95), weight_decay=g.wd)
    t0, formed, log = time.time(), None, []
    def evaluate(step):
        nonlocal formed
        with torch.no_grad():
            lg = model(ev_ids)
            nll = float(F.cross_entropy(lg[:, :-1].transpose(1, 2), ev_lab[:, 1:], ignore_index=-100))
        if ev2 is not None:
            with torch.no_grad():
                lg2 = model(ev2[0])
                nll2 = float(F.cross_entropy(lg2[:, :-1].transpose(1, 2), ev2[1][:, 1:], ignore_index=-100))
            print(json.dumps({"step": step, "len2_copy_nll": round(nll2, 3)}), flush=True)
        if formed is None and nll < 1.0: formed = step
        log.append((step, round(nll, 2))); print(json.dumps({"step": step, "s": round(time.time() - t0), "copy_nll": round(nll, 3)}), flush=True)
    for step in range(g.steps):
        if step % g.every == 0: evaluate(step)
        if time.time() - t0 > g.seconds: break
        ids, lab = batch([g.seed, step], g.batch) if not g.switch or step < g.switch else batch([g.seed, step], g.batch2, g.len2)
        tgt = lab[:, 1:] if g.answer_loss else ids[:, 1:]
        for pg in opt.param_groups: pg["lr"] = g.lr * min(1.0, (step + 1) / max(1, g.warmup))
        lg = model(ids)
        loss = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
    else:
        step = g.steps; evaluate(step)
    res = {k: v for k, v in vars(g).items()}; res.update(formed=formed, steps=step, wall_s=round(time.time() - t0),
          final=log[-1][1], log=log)
    print("RESULT " + json.dumps(res), flush=True)

main()
