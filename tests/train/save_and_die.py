"""Helper process for test_interrupts.py: save checkpoint step 1 normally, then save again (step given
on the command line) and SIGKILL itself half way through writing the optimizer state."""

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nosa.data.tokenization import load_tokenizer  # noqa: E402
from nosa.train import checkpoint  # noqa: E402
from nosa.train.distributed import DistInfo  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

out_dir, second_step = sys.argv[1], int(sys.argv[2])
model = tiny_model("nosa")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(torch.randint(0, 97, (1, 20)), labels=torch.randint(0, 97, (1, 20))).loss.backward()
optimizer.step()
info = DistInfo(0, 1, 0, torch.device("cpu"))
tok = load_tokenizer("byte")
checkpoint.save_checkpoint(out_dir, model, optimizer, tok, 1, 10, {"seed": 1}, info)
print("first save done", flush=True)

real_save = torch.save


def save_half_then_die(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = save_half_then_die
checkpoint.save_checkpoint(out_dir, model, optimizer, tok, second_step, 20, {"seed": 1}, info)
print("not reached", flush=True)
