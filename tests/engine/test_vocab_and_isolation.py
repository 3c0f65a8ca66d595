"""Ids beyond the tokenizer's vocabulary (a model's padded vocabulary) are never sampled, and a request whose
own bookkeeping fails is finished with an error alone while the others of its step go on."""

import torch

from tests.helpers import engine_model as tiny_model
from nosa.engine import LLM, SamplingParams
from nosa.tokenizer import ByteTokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_padded_vocabulary_ids_are_never_sampled():
    model = tiny_model("nosa", seed=3)
    tok = ByteTokenizer()
    assert model.config.vocab_size > len(tok)  # the engine preset pads the vocabulary: 264 against 259
    prompt = [5, 17, 99, 3, 200, 41, 8]
    with torch.no_grad():  # the padding ids become the most likely next tokens of the prompt
        top = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
        model.lm_head.weight[len(tok):] = 3 * model.lm_head.weight[top]
        assert int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax()) >= len(tok)
    llm = LLM(model, tokenizer=tok, device="cpu", max_model_len=32, max_num_seqs=2)
    sampled = SamplingParams(temperature=1.0, seed=4, max_tokens=6, ignore_eos=True, logprobs=2)
    for out in llm.generate([prompt, prompt], [GREEDY, sampled], use_tqdm=False):
        assert out.finish_reason == "length" and all(0 <= t < len(tok) for t in out.token_ids), out.token_ids
    # greedy is the argmax over the tokenizer's ids: the model's own first choice among them
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([prompt])).logits[0, -1, : len(tok)].argmax())
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids[0] == first


class _RefusingTokenizer(ByteTokenizer):
    """Cannot decode one token id: stands for any per-request failure after the step's forward."""

    def __init__(self, refused: int):
        super().__init__()
        self.refused = refused

    def decode(self, ids, **kw):
        if self.refused in ids:
            raise ValueError(f"cannot decode token {self.refused}")
        return super().decode(ids, **kw)


def test_a_request_that_fails_alone_does_not_harm_the_others():
    model = tiny_model("nosa", seed=5, vocab_size=259)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 100, 50, 25, 12, 6]
    alone = LLM(model, tokenizer=ByteTokenizer(), device="cpu", max_model_len=32, max_num_seqs=2)
    out_a, out_b = alone.generate([a, b], GREEDY, use_tqdm=False)
    refused = next(t for t in out_a.token_ids[1:] if t not in out_b.token_ids)  # a decode-step token of a only
    llm = LLM(model, tokenizer=_RefusingTokenizer(refused), device="cpu", max_model_len=32, max_num_seqs=2)
    first, second = llm.generate([a, b], GREEDY, use_tqdm=False)
    assert first.finish_reason == "error" and f"cannot decode token {refused}" in first.error
    assert second.finish_reason == "length" and second.token_ids == out_b.token_ids
    assert llm.free_rows == llm.max_num_seqs and llm.free_pages == llm.num_pages  # everything given back
