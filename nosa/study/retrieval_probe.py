"""CPU probe behind the study's data recipe: which training rows make retrieval form fast.

A small dense model is trained for a fixed wall time on one training-row recipe, then scored on the
evaluation's own task definitions (passkey, multikey_niah with one query, answer-only scoring). Used to
pick the mixture of `nosa study quality`; the runs are recorded in docs/quality.md.

    python -m nosa.study.retrieval_probe --recipe full --seconds 150 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from nosa.config import NosaConfig
from nosa.data.tasks import generate_task
from nosa.data.tokenization import load_tokenizer
from nosa.eval.tasks import evaluate_tasks
from nosa.models import NosaForCausalLM

# recipe -> list of (task, task params, full LM loss) drawn uniformly per row
RECIPES = {
    "drill": [("passkey", {}, True), ("multikey_niah", {}, True), ("kv_recall", {}, True), ("kv_recall", {}, True)],
    "pk_answer": [("passkey", {}, False)],
    "pk_full": [("passkey", {}, True)],
    "pk_full_d3": [("passkey", {"digits": 3}, True)],
    "answer": [("passkey", {}, False), ("multikey_niah", {}, False)],
    "full": [("passkey", {}, True), ("multikey_niah", {}, True)],
    "mq": [("passkey", {}, False), ("multikey_niah", {"num_queries": 4}, False)],
    "mq_full": [("passkey", {}, True), ("multikey_niah", {"num_queries": 4}, True)],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    p.add_argument("--seconds", type=float, default=150)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local tokenizer directory")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.tokenizer)
    cfg = NosaConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                     num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=4096, attn_mode="dense", pad_token_id=tok.pad_id,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = NosaForCausalLM(cfg).float()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    recipe = RECIPES[args.recipe]
    began, step, log = time.time(), 0, []
    while time.time() - began < args.seconds:
        rng = np.random.default_rng([args.seed, step])
        ids, labels = [], []
        for r in range(args.batch):
            task, params, full = recipe[int(rng.integers(len(recipe)))]
            s = generate_task(task, tok, rng, args.seq_len, float(rng.random()), **params)
            ids.append(s.input_ids)
            # answer loss counted separately so recipes compare on the same quantity
            labels.append(s.labels(full=full))
        ids, labels = torch.tensor(ids), torch.tensor(labels)
        lr = args.lr * min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 100 == 0:
            log.append((step, round(time.time() - began), round(float(loss.detach()), 3)))
    train_s = time.time() - began
    tasks = sorted({t for t, _, _ in recipe} & {"passkey", "multikey_niah"})
    res = evaluate_tasks(model, tok, tasks, [args.seq_len], [0.0, 0.5, 1.0],
                         args.eval_samples, torch.device("cpu"), None, 16, 1234)
    # Answer NLL (teacher forced, nats per answer token; ln 10 = 2.30 is guessing a digit): a signal
    # that moves long before exact-match accuracy does.
    nll = {}
    with torch.no_grad():
        for task in tasks:
            total = count = 0.0
            for i in range(args.eval_samples):
                s = generate_task(task, tok, np.random.default_rng([4321, i]), args.seq_len, float(i % 5) / 4)
                ids = torch.tensor([s.input_ids])
                lab = torch.tensor([s.labels()])
                logits = model(input_ids=ids, use_cache=False).logits
                total += float(F.cross_entropy(logits[:, :-1].transpose(1, 2), lab[:, 1:], ignore_index=-100, reduction="sum"))
                count += int((lab[:, 1:] != -100).sum())
            nll[task] = round(total / count, 3)
    out = {"recipe": args.recipe, "tokenizer": args.tokenizer, "vocab_size": tok.vocab_size, "seq_len": args.seq_len, "layers": args.layers, "hidden": args.hidden,
           "steps": step, "rows": step * args.batch, "train_s": round(train_s), "loss_log": log[-5:],
           **{t: res[t]["accuracy"] for t in tasks}, "answer_nll": nll}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
