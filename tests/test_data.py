"""graphrepair.io.data and io.examples: batches from every accepted kind of data, numbers of examples, data files."""

from __future__ import annotations

import itertools
import textwrap
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from graphrepair.io.data import ArrayDataset, load_data, load_data_file
from graphrepair.io.checks import check_batch_shape
from graphrepair.io.examples import Examples, FewerExamplesWarning
from graphrepair.errors import DataError, LoadError
from graphrepair.io.fileio import save_safetensors

X = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
Y = torch.arange(10) % 4


def sizes(batches) -> list[int]:
    return [b.shape[0] for b in batches]


def joined(batches) -> torch.Tensor:
    return torch.cat(list(batches))


# --------------------------------------------------------------------------------------------------
# Examples: batches of every kind of data (io.examples)


def iter_batches(data, batch_size=256, device=None):
    """The input tensor of every batch (one-input data)."""
    return [b.inputs.first for b in Examples(data, None, batch_size, device=device)]


def iter_labeled(data, batch_size=256, device=None):
    return [(b.inputs.first, b.labels) for b in Examples(data, None, batch_size, device=device, labels=True)]


def take_examples(data, n, batch_size=256):
    return Examples(data, n, batch_size)


def test_tensor_is_split() -> None:
    batches = list(iter_batches(X, batch_size=4))
    assert sizes(batches) == [4, 4, 2]
    assert torch.equal(torch.cat(batches), X)


def test_numpy_array_is_split() -> None:
    assert sizes(iter_batches(X.numpy(), batch_size=6)) == [6, 4]


def test_dataloader_yields_inputs() -> None:
    loader = DataLoader(TensorDataset(X, Y), batch_size=3)
    assert torch.equal(joined(iter_batches(loader)), X)
    assert sizes(iter_batches(loader)) == [3, 3, 3, 1]  # the loader's own batches


def test_list_of_tuples_and_lists() -> None:
    data = [(X[:5], Y[:5]), [X[5:], Y[5:]]]
    assert torch.equal(joined(iter_batches(data)), X)
    pairs = list(iter_labeled(data))
    assert torch.equal(torch.cat([y for _, y in pairs]), Y)


def test_dict_batches_keep_every_keyword_input() -> None:
    ids = torch.randint(0, 100, (4, 7))
    (batch,) = Examples([{"attention_mask": ids * 0, "input_ids": ids}])
    assert batch.inputs.names == ["attention_mask", "input_ids"]  # the mask is not dropped
    assert torch.equal(batch.inputs.kwargs["input_ids"], ids) and batch.inputs.args == ()
    assert torch.equal(next(iter(iter_batches([{"labels": Y[:4], "x": X[:4]}]))), X[:4])
    (batch,) = Examples([{"pixel_values": X[:4]}])
    assert torch.equal(batch.inputs.kwargs["pixel_values"], X[:4])
    (batch,) = Examples([{"input_ids": ids, "labels": Y[:4]}], labels=True)
    assert batch.inputs.names == ["input_ids"] and torch.equal(batch.labels, Y[:4])


def test_in_memory_datasets_are_sliced() -> None:
    for data in (TensorDataset(X, Y), ArrayDataset(X, Y), {"x": X, "y": Y}):
        assert sizes(iter_batches(data, batch_size=4)) == [4, 4, 2]
        pairs = list(iter_labeled(data, batch_size=4))
        assert torch.equal(torch.cat([y for _, y in pairs]), Y)


def test_dict_of_keyword_arrays_is_split() -> None:
    ids = torch.randint(0, 100, (10, 7))
    batches = list(Examples({"input_ids": ids, "attention_mask": ids % 2, "labels": Y}, None, 4, labels=True))
    assert [b.size for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b.inputs.kwargs["attention_mask"] for b in batches]), ids % 2)
    assert torch.equal(torch.cat([b.labels for b in batches]), Y)


def test_xy_tuple_is_a_dataset_but_a_list_is_batches() -> None:
    assert sizes(iter_batches((X, Y), batch_size=4)) == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in iter_labeled((X, Y), batch_size=4)]), Y)
    assert sizes(iter_batches([X, X[:3]])) == [10, 3]
    assert sizes(iter_batches((X, X[:3]))) == [10, 3]  # lengths differ: two batches


def test_a_list_of_inputs_and_their_labels_is_refused_saying_to_give_a_tuple() -> None:
    # before: read as two batches, the labels failed in the model as a batch of another shape
    with pytest.raises(DataError, match=r"^data is a list of two tensors, read as two batches, but the second "
                                        r"\(\(10,\) int64\) looks like the labels of the first \(\(10, 3\) "
                                        r"float32\): give inputs and labels as a tuple, \(x, y\)$"):
        list(iter_batches([X, Y]))
    ids = torch.arange(10)  # one-axis integer inputs: two batches of token ids, as before
    assert sizes(iter_batches([ids, ids])) == [10, 10]


def test_map_style_dataset_is_batched() -> None:
    class Squares(Dataset):
        def __len__(self) -> int:
            return 7

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.tensor([float(i * i)]), i

    batches = list(iter_labeled(Squares(), batch_size=3))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 1]
    assert torch.equal(batches[0][1], torch.tensor([0, 1, 2]))


def test_generator_and_integer_dtype_kept() -> None:
    ids = torch.randint(0, 50, (6, 5))
    out = list(iter_batches(b for b in (ids[:2], ids[2:])))
    assert all(b.dtype == torch.int64 for b in out)
    assert torch.equal(torch.cat(out), ids)


def test_floating_inputs_take_the_dtype_given_integers_stay() -> None:
    ids = torch.randint(0, 50, (6, 5))
    (batch,) = Examples([{"input_ids": ids, "mask": ids.float()}], dtype=torch.bfloat16)
    assert batch.inputs.kwargs["input_ids"].dtype == torch.int64
    assert batch.inputs.kwargs["mask"].dtype == torch.bfloat16


def test_device_move() -> None:
    (x,) = iter_batches(X, batch_size=32, device="cpu")
    assert x.device.type == "cpu"
    (x, y), = iter_labeled(ArrayDataset(X, Y), device=torch.device("cpu"))
    assert y.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_move_cuda() -> None:
    x, y = next(iter(iter_labeled([(X, Y)], device="cuda")))
    assert x.is_cuda and y.is_cuda


def test_empty_batches_skipped() -> None:
    assert sizes(iter_batches([X[:0], X[:2], X[:0]])) == [2]


@pytest.mark.parametrize("data", [torch.empty(0, 3), [], [X[:0]], DataLoader(TensorDataset(torch.empty(0, 3)))])
def test_no_batches(data) -> None:
    with pytest.raises(DataError, match="has no batches"):
        list(iter_batches(data))


def test_exhausted_generator_explains() -> None:
    gen = (b for b in [X])
    list(iter_batches(gen))
    with pytest.raises(DataError, match="can be used once only"):
        list(iter_batches(gen))


@pytest.mark.parametrize(
    "data,message",
    [
        (None, "no data given"),
        ("fit.npz", r"use graphrepair.io.data.load_data"),
        (Path("fit.npz"), r"use graphrepair.io.data.load_data"),
        (torch.tensor(3.0), "scalar tensor"),
        (42, "int is not a tensor, a dataset or an iterable of batches"),
        ([3, 4], "batch 0 of the list given is a int"),
        ([X, ()], "batch 1 of the list given is an empty tuple"),
        ([({"a": 1}, Y)], "the input of batch 0 of the list given: 'a' is a int, not a tensor"),
        ([torch.tensor(1.0)], "the input '0' of batch 0 of the list given is a scalar"),
        ([{}], "batch 0 of the list given is an empty dict"),
        ({"images": [1, 2]}, "dict is not a tensor"),
    ],
)
def test_bad_data(data, message: str) -> None:
    with pytest.raises(DataError, match=message):
        list(iter_batches(data))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size(batch_size) -> None:
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        list(iter_batches(X, batch_size=batch_size))


def test_labels_required_for_evaluation() -> None:
    with pytest.raises(DataError, match="the data tensor: batch 0 has inputs but no labels"):
        list(iter_labeled(X))
    with pytest.raises(DataError, match="batch 0 has 5 inputs but labels of shape \\(4,\\)"):
        list(iter_labeled([(X[:5], Y[:4])]))
    with pytest.raises(DataError, match="x has 10 examples, y has 4"):
        list(iter_labeled(ArrayDataset(X, Y[:4])))
    with pytest.raises(DataError, match="the labels are a list"):
        list(iter_labeled([(X[:2], ["cat", "dog"])]))


# --------------------------------------------------------------------------------------------------
# A number of examples


def test_take_examples_trims_last_batch() -> None:
    stream = take_examples(X, 7, batch_size=3)
    batches = iter_batches(stream)
    assert sizes(batches) == [3, 3, 1]
    assert torch.equal(torch.cat(batches), X[:7])
    assert stream.count == 7 and stream.n == 7


def test_take_examples_stops_reading() -> None:
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield X[:4]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when enough examples exist
        assert sizes(iter_batches(take_examples(endless(), 10))) == [4, 4, 2]
    assert pulled == [0, 1, 2]


def test_take_examples_exact_fit_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sizes(iter_batches(take_examples(X, 10, batch_size=5))) == [5, 5]


def test_take_examples_warns_with_count() -> None:
    stream = take_examples([X[:4], X[:3]], 5000)
    with pytest.warns(FewerExamplesWarning, match="has only 7 examples, fewer than the 5000 requested; using 7"):
        assert [b.size for b in stream] == [4, 3]
    assert stream.count == 7


def test_take_examples_labeled() -> None:
    pairs = [(b.inputs.first, b.labels) for b in Examples(ArrayDataset(X, Y), 5, 4, labels=True)]
    assert [(x.shape[0], y.shape[0]) for x, y in pairs] == [(4, 4), (1, 1)]
    assert torch.equal(pairs[1][1], Y[4:5])


def test_take_examples_empty_data() -> None:
    with pytest.raises(DataError, match="no batches"):
        list(take_examples([], 10))


@pytest.mark.parametrize("n", [0, -3, 1.5])
def test_take_examples_bad_count(n) -> None:
    with pytest.raises(DataError, match="number of examples must be a positive integer"):
        take_examples(X, n)


# --------------------------------------------------------------------------------------------------
# Data files


def saved(tmp_path: Path, suffix: str, x: torch.Tensor, y: torch.Tensor | None) -> Path:
    path = tmp_path / f"data{suffix}"
    items = {"x": x} if y is None else {"x": x, "y": y}
    if suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in items.items()})
    elif suffix == ".npy":
        np.save(path, x.numpy())
    elif suffix == ".pt":
        torch.save(items, path)
    else:
        save_safetensors(items, path)
    return path


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_data_file_round_trip(tmp_path: Path, suffix: str, dtype: torch.dtype) -> None:
    x = (torch.arange(24).reshape(6, 2, 2) % 200).to(dtype)
    data = load_data_file(saved(tmp_path, suffix, x, Y[:6]))
    assert isinstance(data, ArrayDataset)
    assert data.x.dtype == dtype  # integers stay integers, floats stay floats
    assert torch.equal(data.x, x) and torch.equal(data.y, Y[:6])
    assert data.source.endswith(f"data{suffix}") and len(data) == 6
    assert sizes(iter_batches(data, batch_size=4)) == [4, 2]


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".safetensors"])
def test_data_file_without_labels(tmp_path: Path, suffix: str) -> None:
    data = load_data_file(saved(tmp_path, suffix, X, None))
    assert data.y is None and torch.equal(data.x, X)
    with pytest.raises(DataError, match="no labels"):
        list(iter_labeled(data))


def test_pt_file_with_bare_tensor(tmp_path: Path) -> None:
    torch.save(X, tmp_path / "x.pt")
    assert torch.equal(load_data_file(tmp_path / "x.pt").x, X)


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_data_file_of_named_arrays_gives_keyword_inputs(tmp_path: Path, suffix: str) -> None:
    """Without 'x', a file's named arrays are the forward's keyword inputs; 'labels' (or 'y',
    'label') are the labels."""
    path = tmp_path / f"d{suffix}"
    ids = torch.randint(0, 100, (len(X), 7))
    arrays = {"input_ids": ids, "attention_mask": (ids % 2), "labels": Y}
    if suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    elif suffix == ".pt":
        torch.save(arrays, path)
    else:
        save_safetensors(arrays, path)
    data = load_data_file(path)
    assert sorted(data.x) == ["attention_mask", "input_ids"] and len(data) == len(X)
    assert torch.equal(data.x["input_ids"], ids) and torch.equal(data.y, Y)
    batches = list(Examples(data, None, 4, labels=True))
    assert [b.size for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b.inputs.kwargs["attention_mask"] for b in batches]), ids % 2)
    assert torch.equal(torch.cat([b.labels for b in batches]), Y)
    row, label = data[3]
    assert torch.equal(row["input_ids"], ids[3]) and int(label) == int(Y[3])


def test_data_file_of_named_arrays_is_checked(tmp_path: Path) -> None:
    np.savez(tmp_path / "short.npz", input_ids=np.zeros((10, 3), np.int64), attention_mask=np.ones((9, 3), np.int64))
    with pytest.raises(DataError, match=r"inputs differ in length \('input_ids' 10, 'attention_mask' 9\)"):
        load_data_file(tmp_path / "short.npz")
    np.savez(tmp_path / "labels_only.npz", labels=Y.numpy())
    with pytest.raises(DataError) as info:
        load_data_file(tmp_path / "labels_only.npz")
    assert "has no inputs (it has: labels)" in str(info.value) and "input_ids=ids" in str(info.value)
    np.savez(tmp_path / "bad.npz", input_ids=np.zeros((10, 3)), labels=np.zeros(8, np.int64))
    with pytest.raises(DataError, match="'input_ids' has 10 examples but 'labels' has 8"):
        load_data_file(tmp_path / "bad.npz")


def test_data_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data_file(tmp_path / "absent.npz")
    with pytest.raises(DataError, match="is a directory"):
        load_data_file(tmp_path)
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"unknown extension '\.csv'; expected one of \.npz, \.npy, \.pt, \.safetensors"):
        load_data_file(tmp_path / "d.csv")
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"cannot read data file '.*bad\.npz'"):
        load_data_file(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    "items,message",
    [
        ({"x": np.array([{"a": 1}], dtype=object)}, "cannot read data file"),  # pickled objects refused
        ({"x": np.zeros((3, 2), dtype=bool)}, "dtype torch.bool; expected integers or floats"),
        ({"x": np.float32(1.0)}, "'x' is a scalar"),
        ({"x": np.array([[1.0, np.nan], [np.inf, 0]])}, "'x' has 2 NaN or infinite values"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, "'x' has 4 examples but 'y' has 3"),
        ({"x": np.zeros((0, 2))}, "has no examples"),
    ],
)
def test_data_file_bad_contents(tmp_path: Path, items: dict, message: str) -> None:
    np.savez(tmp_path / "d.npz", **items)
    with pytest.raises(DataError, match=message) as info:
        load_data_file(tmp_path / "d.npz")
    assert "d.npz" in str(info.value)


def test_pt_data_wrong_types(tmp_path: Path) -> None:
    torch.save([X, Y], tmp_path / "list.pt")
    with pytest.raises(DataError, match="holds a list; expected a dict with 'x'"):
        load_data_file(tmp_path / "list.pt")
    torch.save({"x": [1, 2, 3]}, tmp_path / "xlist.pt")
    with pytest.raises(DataError, match="'x' is a list, not an array"):
        load_data_file(tmp_path / "xlist.pt")


# --------------------------------------------------------------------------------------------------
# load_data (files and MODULE:FUNCTION)


def test_load_data_file_path(tmp_path: Path) -> None:
    path = saved(tmp_path, ".npz", X, Y)
    assert torch.equal(load_data(str(path)).x, X)
    assert torch.equal(load_data(path).y, Y)


def test_load_data_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"grtest_data_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        def batches():
            return [(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))] * 3
        def number():
            return 3
        def text():
            return "fit.npz"
    """))
    data = load_data(f"{name}:batches")
    assert sizes(iter_batches(data)) == [2, 2, 2]
    for fn in ("number", "text"):
        with pytest.raises(DataError, match=f"'{name}:{fn}' returned a (int|str); FUNCTION must return data"):
            load_data(f"{name}:{fn}")
    # Resolved by the same code as MODULE:FACTORY, with its messages.
    with pytest.raises(LoadError, match="did you mean: batches"):
        load_data(f"{name}:batchs")


def test_load_data_neither_file_nor_reference(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither an existing file nor a MODULE:FUNCTION reference"):
        load_data(str(tmp_path / "fitdata"))
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "fit.npz"))


# --------------------------------------------------------------------------------------------------
# check_batch_shape


def test_check_batch_shape() -> None:
    check_batch_shape(torch.zeros(5, 3, 32, 32), (3, 32, 32), "--data fit.npz")
    check_batch_shape(torch.zeros(5, 17), (None,), "tokens")
    check_batch_shape(torch.zeros(5, 17), [-1], "tokens")
    with pytest.raises(DataError) as info:
        check_batch_shape(torch.zeros(5, 1, 28, 28), (3, 32, 32), "--data fit.npz")
    assert str(info.value).startswith("--data fit.npz: examples have shape (1, 28, 28) (batch (5, 1, 28, 28)), expected (3, 32, 32)")
    with pytest.raises(DataError, match=r"shape \(784,\) .*expected \(1, 28, 28\)"):
        check_batch_shape(torch.zeros(5, 784), (1, 28, 28), "x")
    with pytest.raises(DataError, match=r"expected \(\*, 8\)"):
        check_batch_shape(torch.zeros(5, 4, 9), (None, 8), "x")
