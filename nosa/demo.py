"""`nosa demo`: train a tiny NOSA model on the Python standard library's sources, then generate from a
prompt much longer than the attended budget and report what the sparse selection did.

Runs on a CPU-only machine with nothing prepared in a few minutes; uses the GPU when there is one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import sysconfig
import time

import torch
from tqdm.auto import tqdm

from nosa import NosaConfig, NosaForCausalLM
from nosa.command import resolve_device
from nosa.results.locality import bound_quota, locality_summary
from nosa.tokenizer import ByteTokenizer

DEMO_MODEL = dict(
    vocab_size=264, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=8192, attn_mode="nosa",
    # 8 blocks of 16 tokens attended out of many: 1 sink + own + 2 window, 2 query-aware, 2 agnostic.
    block_size=16, topk_blocks=8, sink_blocks=1, window_blocks=2, query_blocks=2, compress_kernel=16, compress_stride=8,
)


def stdlib_text_files() -> list[str]:
    """The standard library's .py files, sorted, so every machine reads the same corpus in the same order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))
    if not files:
        raise RuntimeError(f"no Python sources found under {root}")
    return files


def load_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, held-out bytes) as uint8 tensors; every 20th file (at least one) is held out."""
    files, total = [], 0
    for path in stdlib_text_files():
        with open(path, "rb") as f:
            files.append(f.read())
        total += len(files[-1])
        if total >= max_bytes:
            break
    held = [i for i in range(len(files)) if i % 20 == 19] or [len(files) - 1]
    train = [data for i, data in enumerate(files) if i not in held]
    if not train:
        raise ValueError(f"--corpus-bytes={max_bytes} reads a single file: nothing is left to train on")

    def as_tensor(chunks):
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return as_tensor(train), as_tensor([files[i] for i in held])


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, corpus: torch.Tensor, args, device) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses, tokens, start = [], 0, time.perf_counter()
    model.train()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        offsets = torch.randint(0, len(corpus) - args.seq_len, (args.batch_size,), generator=generator)
        batch = torch.stack([corpus[o : o + args.seq_len] for o in offsets.tolist()]).long().to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=max(1, args.steps // 10))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        tokens += batch.numel()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    return {"losses": losses, "tokens_per_s": tokens / (time.perf_counter() - start)}


def selection_statistics(logs: list[list[torch.Tensor]], prompt_length: int, sparse) -> dict:
    """From per-layer selection logs of a batch-1 generate: blocks attended vs visible at the last step,
    and how many blocks each step newly needs per (layer, KV head)."""
    traces = [torch.cat([entry[:, -1:] for entry in log], dim=1).cpu() for log in logs]  # prefill's last query first
    summary = locality_summary(traces, prompt_length - 1, sparse.block_size, sparse.topk_blocks, bound_quota(sparse))
    steps = traces[0].shape[1]
    last = [trace[0, -1] for trace in traces]
    attended = sum(int((entry >= 0).sum()) for entry in last)
    visible = sum(entry.shape[0] for entry in last) * ((prompt_length + steps - 2) // sparse.block_size + 1)
    heads = len(traces) * traces[0].shape[2]
    within = [r["new_blocks_max_within_block"] for r in summary["per_layer"] if r["new_blocks_max_within_block"] is not None]
    return {
        "attended_fraction": attended / visible,
        "blocks_attended": attended / heads,
        "blocks_visible": visible / heads,
        "new_blocks_per_step": summary["new_blocks_mean"],
        "overlap_rate": summary["overlap_mean"],
        "worst_new_within_block": max(within, default=0),
    }


def generate(model, tokenizer, prompt_ids: torch.Tensor, args, device) -> dict:
    model.eval()
    logs = []
    for layer in model.model.layers:
        layer.self_attn.selection_log = []
        logs.append(layer.self_attn.selection_log)
    input_ids = prompt_ids[None].to(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=args.new_tokens,
            do_sample=True, temperature=0.8, top_k=40, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    seconds = time.perf_counter() - start
    for layer in model.model.layers:
        layer.self_attn.selection_log = None
    new_tokens = output[0, input_ids.shape[1]:]
    stats = selection_statistics(logs, input_ids.shape[1], model.config.sparse)
    stats.update(text=tokenizer.decode(new_tokens), new_tokens=len(new_tokens), tokens_per_s=len(new_tokens) / seconds)
    return stats


def run(args) -> int:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    # torch's own default (one thread per core, or OMP_NUM_THREADS) unless --threads says otherwise:
    # forcing os.cpu_count() threads collapsed throughput when another process shared the cores.
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    tokenizer = ByteTokenizer()
    config = NosaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **DEMO_MODEL)
    for flag, value, minimum in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                                 ("--new-tokens", args.new_tokens, 2), ("--corpus-bytes", args.corpus_bytes, 1)):
        if value < minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    if args.seq_len < 2 or args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len must lie in [2, {config.max_position_embeddings}], got {args.seq_len}")
    budget = config.topk_blocks * config.block_size
    if args.prompt_tokens <= budget:
        raise ValueError(f"--prompt-tokens must exceed topk_blocks x block_size = {budget} for the selection to be sparse")
    corpus, held_out = load_corpus(args.corpus_bytes)
    if len(held_out) < args.prompt_tokens:
        raise ValueError(f"held-out text has {len(held_out)} bytes, fewer than --prompt-tokens={args.prompt_tokens}")
    model = NosaForCausalLM(config).to(device)
    print(f"NOSA demo on {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(corpus) / 1e6:.1f} MB of standard-library source, sequences of {args.seq_len} tokens; "
          f"each query attends to {config.topk_blocks} blocks of {config.block_size} tokens "
          f"({config.sink_blocks} sink + own + {config.window_blocks} window, {config.query_blocks} query-aware, "
          f"{config.sparse.agnostic_quota} by the eviction head)")
    trained = train(model, corpus, args, device)
    losses = trained["losses"]
    head = sum(losses[:10]) / len(losses[:10])
    tail = sum(losses[-10:]) / len(losses[-10:])
    marks = [losses[int(i * (len(losses) - 1) / 4)] for i in range(5)]
    print(f"\nloss: {head:.3f} (first 10 steps) -> {tail:.3f} (last 10 steps); at 0/25/50/75/100%: "
          + " ".join(f"{m:.3f}" for m in marks))
    print(f"training throughput: {trained['tokens_per_s']:.0f} tokens/s")
    prompt = torch.tensor([tokenizer.bos_token_id] + held_out[: args.prompt_tokens - 1].tolist())
    result = generate(model, tokenizer, prompt, args, device)
    print(f"\ngenerated {result['new_tokens']} tokens after a {len(prompt)}-token prompt "
          f"({len(prompt) / budget:.1f}x the {budget}-token attended budget) at {result['tokens_per_s']:.1f} tokens/s:")
    print("-" * 72)
    # Bold marks the generated text on a terminal; a file or pipe gets the plain text.
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(tokenizer.decode(prompt[-200:]) + bold + result["text"] + plain)
    print("-" * 72)
    print(f"selection at the last step: {result['blocks_attended']:.1f} of {result['blocks_visible']:.1f} visible blocks "
          f"per (layer, KV head) ({100 * result['attended_fraction']:.1f}% of the context)")
    print(f"between consecutive steps: {result['new_blocks_per_step']:.2f} newly needed blocks on average, "
          f"overlap rate {100 * result['overlap_rate']:.1f}%, at most {result['worst_new_within_block']} within a block "
          f"(bound: query_blocks = {config.query_blocks})")
    if args.output_dir:
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        print(f"model and tokenizer saved to {args.output_dir}")
    if args.summary:
        write_summary(args, trained, result, time.perf_counter() - started, device)
        print(f"summary written to {args.summary}")
    return 0


def write_summary(args, trained: dict, result: dict, seconds: float, device) -> None:
    """The run's figures with the machine header, so quoted numbers come from a file."""
    from nosa.results.header import machine_header

    losses = trained["losses"]
    summary = {
        "machine": machine_header(),
        "parameters": {k: v for k, v in vars(args).items() if k != "func"} | {"device": str(device), "model": DEMO_MODEL},
        "results": {
            "wall_s": seconds,
            "loss_first_10": sum(losses[:10]) / len(losses[:10]),
            "loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
            "losses": losses,
            "train_tokens_per_s": trained["tokens_per_s"],
            **{k: v for k, v in result.items() if k != "text"},
        },
    }
    directory = os.path.dirname(args.summary)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=2)


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train a tiny NOSA model on local text and generate from a long prompt")
    parser.add_argument("--steps", type=int, default=350, help="training steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512, help="training sequence length (32 blocks of 16)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--corpus-bytes", type=int, default=8_000_000, help="bytes of standard-library source to read")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=120)
    parser.add_argument("--output-dir", default=os.path.join("runs", "demo"), help="where to save the model ('' to skip)")
    parser.add_argument("--summary", default=None, help="also write the figures, with the machine header, to this JSON file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's, which OMP_NUM_THREADS sets)")
    parser.set_defaults(func=run)
