"""graphrepair.io.inputs: the one form of a model's input (positional and keyword tensors)."""

import numpy as np
import pytest
import torch

from graphrepair.errors import DataError
from graphrepair.io.inputs import Inputs, split_batch


def test_of_each_form():
    x, m = torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long)
    assert Inputs.of(x).args[0] is x and not Inputs.of(x).kwargs
    assert Inputs.of((x, m)).args == (x, m)
    kw = Inputs.of({"input_ids": m, "attention_mask": m, "labels": m[:, 0]})
    assert list(kw.kwargs) == ["input_ids", "attention_mask"]  # labels are not an input
    assert Inputs.of(np.zeros((2, 3), np.float32)).first.shape == (2, 3)
    assert kw.batch_size == 3 and kw.signature() == (("input_ids", "torch.int64", (4,)),
                                                     ("attention_mask", "torch.int64", (4,)))


@pytest.mark.parametrize("bad, words", [
    ("text", "is a str"), ((), "empty tuple"), ((torch.ones(2), "a"), "positional input 1 is a str"),
    ({"a": [1, 2]}, "'a' is a list"), ({"labels": torch.ones(2)}, "no input tensor"), ({1: torch.ones(2)}, "not a string"),
])
def test_of_refuses_with_the_item(bad, words):
    with pytest.raises(DataError, match=words):
        Inputs.of(bad)


def test_batch_size_must_agree():
    with pytest.raises(DataError, match="differ in their number of examples"):
        Inputs.of({"a": torch.ones(2, 1), "b": torch.ones(3, 1)}).batch_size
    with pytest.raises(DataError, match="scalar"):
        Inputs.of(torch.tensor(1.0)).batch_size


def test_to_casts_floats_only_and_head_cat():
    inp = Inputs.of({"pixel_values": torch.randn(4, 2), "ids": torch.arange(4)})
    half = inp.to(dtype=torch.float16)
    assert half.kwargs["pixel_values"].dtype == torch.float16 and half.kwargs["ids"].dtype == torch.int64
    assert torch.equal(Inputs.cat([inp.head(1), inp.slice(1, 4)]).kwargs["ids"], torch.arange(4))


def test_call_passes_positional_and_keyword():
    def f(a, b=None, *, scale=None):
        return a + b * scale
    out = Inputs((torch.ones(2),), {"b": torch.full((2,), 2.0), "scale": torch.full((2,), 3.0)}).call(f)
    torch.testing.assert_close(out, torch.full((2,), 7.0))


def test_fingerprint_tells_order_apart():
    x = torch.randn(8, 5)
    assert Inputs.of(x).fingerprint() == Inputs.of(x.clone()).fingerprint()
    assert Inputs.of(x).fingerprint() != Inputs.of(x[torch.randperm(8, generator=torch.Generator().manual_seed(1))]).fingerprint()


def test_split_batch():
    x, y = torch.randn(4, 3), torch.arange(4)
    inp, lab = split_batch((x, y))
    assert inp.args[0] is x and lab is y
    inp, lab = split_batch({"input_ids": y, "attention_mask": y, "labels": y})
    assert set(inp.kwargs) == {"input_ids", "attention_mask"} and lab is y
    inp, lab = split_batch({"x": x, "y": y})
    assert inp.args[0] is x and lab is y
    inp, lab = split_batch(((x, x), y))
    assert len(inp.args) == 2 and lab is y
    with pytest.raises(DataError, match="batch 3 is a set"):
        split_batch({1, 2}, "batch 3")


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.h = torch.nn.Linear(8, 16), torch.nn.Linear(3, 16), torch.nn.Linear(16, 2)

    def forward(self, x, y, scale=1.0):
        return self.h(torch.relu(self.a(x) + self.b(y))) * scale


def test_a_forward_of_several_inputs_fed_pairs_says_how_to_give_them():
    """Batches (x, y) give the forward x alone (y is read as the labels). Before: a ShapeError from
    inside the trace, "Expected positional argument for parameter y", asking to check the shape."""
    import graphrepair as gr

    torch.manual_seed(0)
    a, b = TwoInputs().eval(), TwoInputs().eval()
    x, y = torch.randn(64, 8), torch.randn(64, 3)
    with pytest.raises(DataError, match=r"TwoInputs.forward needs 'y' too, and the input gives 1 positional "
                                        r"tensor\. A batch \(a, b\) is read as \(input, labels\).*\(\(a, b\), labels\)"):
        gr.merge(a, b, [(x[:32], y[:32]), (x[32:], y[32:])], num_examples=64)
    with pytest.raises(DataError, match=r"needs 'x', 'y' too, and the input gives 0 positional tensors and scale"):
        gr.discover(a, {"scale": torch.ones(4)})
    # the forms the message names: the merge runs, and at alpha 0 (no REPAIR) it is model A
    labels = torch.zeros(32, dtype=torch.long)
    for data in ([((x[:32], y[:32]), labels), ((x[32:], y[32:]), labels)], [((x, y),)]):
        merged = gr.merge(a, b, data, num_examples=64, alpha=0.0, repair=None)
        torch.testing.assert_close(merged(x, y), a(x, y))


def test_data_on_the_meta_device_is_refused_naming_the_input():
    """Before: ``NotImplementedError: Cannot copy out of meta tensor; no data!`` from moving it."""
    import graphrepair as gr

    meta = torch.empty(64, 8, device="meta")
    with pytest.raises(DataError, match=r"^example_inputs: the input is on the meta device \(a shape without values\)"):
        Inputs.of(meta)
    with pytest.raises(DataError, match=r"input 'attention_mask' is on the meta device"):
        Inputs.of({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.empty(2, 3, device="meta")})
    torch.manual_seed(0)
    a, b = TwoInputs().eval(), TwoInputs().eval()
    with pytest.raises(DataError, match="is on the meta device"):
        gr.merge(a, b, [((meta, torch.randn(64, 3)),)], num_examples=64)
