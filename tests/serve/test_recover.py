"""What the service does after a failed engine step (the engine thread's `_recover`), against a stub engine:
finished requests get their result, running ones keep their tokens and go on, waiting and prefilling ones
are left alone (before batched prefill, every request without a token yet that was not waiting was taken
for one admitted in the failed step and aborted)."""

from nosa.engine.sequence import RequestOutput
from nosa.serve.engine_service import Choice, EngineService, _Tracked


class StubEngine:
    def __init__(self, finished: dict, unfinished: dict):
        self.finished, self.unfinished, self.aborted = finished, unfinished, []

    def output(self, request_id):
        if request_id in self.unfinished:
            raise ValueError("not finished")
        if request_id not in self.finished:
            raise KeyError(request_id)
        return self.finished.pop(request_id)

    def tokens_so_far(self, request_id):
        return self.unfinished.get(request_id)

    def abort(self, request_id):
        self.aborted.append(request_id)


class ImmediateLoop:
    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


def test_recover_fails_only_what_the_step_broke_and_keeps_every_token():
    def output(request_id, tokens, reason, error=None):
        return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[1], token_ids=tokens,
                             finish_reason=reason, error=error)

    engine = StubEngine(finished={0: output(0, [5, 6, 7], "length"), 1: output(1, [], "error", "boom in decode")},
                        unfinished={2: [], 3: [8, 9], 4: []})  # 2 waiting, 3 decoding, 4 prefilling
    service = EngineService.__new__(EngineService)
    service.llm, service._loop = engine, ImmediateLoop()
    delivered = []
    service._deliver = lambda batch: delivered.extend(batch)
    service._tracked = {i: _Tracked(Choice(request_id=i, prompt_tokens=1), delivered=d) for i, d in ((0, 1), (1, 0), (2, 0), (3, 1), (4, 0))}
    service._recover(RuntimeError("step failed"))
    events = {choice.request_id: event for choice, event in delivered}
    assert events[0].token_ids == [6, 7] and events[0].finished and events[0].finish_reason == "length"
    assert events[1].finished and events[1].error == "boom in decode"
    assert events[3].token_ids == [9] and not events[3].finished  # kept, and it goes on decoding
    assert 2 not in events and 4 not in events and engine.aborted == []
    assert sorted(service._tracked) == [2, 3, 4] and service._tracked[3].delivered == 2
