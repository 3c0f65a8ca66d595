"""The prefill kernels' do_not_specialize lists name real parameters: Triton ignores a misspelt name
silently, so a typo would bring back a compile per new prompt-length pattern without any error."""

import pytest

triton = pytest.importorskip("triton")

from nosa.ops.kernels import attention, norm_rope, selection  # noqa: E402

KERNELS = [attention._fwd_kernel, selection._window_mean_kernel, selection._qa_block_scores_kernel,
           selection._select_kernel, norm_rope._rotary_kernel]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_every_unspecialised_name_is_a_parameter(kernel):
    names = set(kernel.arg_names)
    # A JITFunction (GPU) keeps the list itself; the interpreter's InterpretedFunction keeps jit's kwargs.
    listed = getattr(kernel, "do_not_specialize", None)
    if listed is None:
        listed = kernel.kwargs.get("do_not_specialize")
    listed = [n for n in listed or () if isinstance(n, str)]
    assert listed, f"{kernel.__name__} has no do_not_specialize list"
    assert set(listed) <= names, f"{kernel.__name__}: not parameters: {sorted(set(listed) - names)}"
    if hasattr(kernel, "params"):  # compiled Triton: each named parameter is marked
        marked = {p.name for p in kernel.params if p.do_not_specialize}
        assert set(listed) <= marked
