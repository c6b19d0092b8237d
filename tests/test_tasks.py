"""Tests of fedaiot.tasks: data loading, models, and federated partitioning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from fedaiot.tasks import (
    PARTITIONERS,
    TASK_NAMES,
    ArrayData,
    DataUnavailableError,
    FederatedData,
    Task,
    UnknownTaskError,
    federate,
    get_task,
    tasks,
)
from fedaiot.tasks.images import FASHION_MNIST_ENV, fashion_mnist_dir
from fedaiot.tasks.partition import _plan_lru, load_raw, plan_partitions

FASHION_AVAILABLE = (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").is_file()
SMALL_TASKS = ["breast-cancer", "digits", "basic-motions", "acsf1"]


def _available(name: str) -> Task:
    if name == "fashion-mnist" and not FASHION_AVAILABLE:
        pytest.skip("fashion-mnist files missing (apt-get install dataset-fashion-mnist)")
    return get_task(name)


def _entropy(labels: np.ndarray, num_classes: int) -> float:
    p = np.bincount(labels, minlength=num_classes) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _assert_same(a: FederatedData, b: FederatedData) -> None:
    assert a.normalization == b.normalization
    np.testing.assert_array_equal(a.test.x, b.test.x)
    assert len(a.partitions) == len(b.partitions)
    for pa, pb in zip(a.partitions, b.partitions, strict=True):
        np.testing.assert_array_equal(pa.x, pb.x)
        np.testing.assert_array_equal(pa.y, pb.y)


# --- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_loads_with_right_shapes(name: str) -> None:
    task = _available(name)
    pool, test = load_raw(task)
    assert len(task.class_names) == task.num_classes
    for data in [pool] if test is None else [pool, test]:
        assert data.x.dtype == np.float32 and data.y.dtype == np.int64
        assert data.x.shape == (len(data), *task.input_shape)
        assert data.y.min() >= 0 and data.y.max() < task.num_classes
        assert np.isfinite(data.x).all()
    assert set(np.unique(pool.y)) == set(range(task.num_classes))
    if task.feature_names is not None:
        assert len(task.input_shape) == 1 and len(task.feature_names) == task.input_shape[0]


def test_known_sizes() -> None:
    assert len(load_raw(get_task("breast-cancer"))[0]) == 569
    assert len(load_raw(get_task("digits"))[0]) == 1797
    assert len(load_raw(get_task("basic-motions"))[0]) == 80


def test_fashion_mnist_split_sizes() -> None:
    pool, test = load_raw(_available("fashion-mnist"))
    assert test is not None and (len(pool), len(test)) == (60000, 10000)
    assert pool.x.min() >= 0.0 and pool.x.max() <= 1.0


def test_fashion_mnist_missing_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(FASHION_MNIST_ENV, str(missing))
    with pytest.raises(DataUnavailableError) as info:
        get_task("fashion-mnist").load()
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(missing) in message and FASHION_MNIST_ENV in message and "\n" not in message


def test_array_data_checks_dtypes() -> None:
    with pytest.raises(ValueError, match="float32"):
        ArrayData(x=np.zeros((2, 3)), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="int64"):
        ArrayData(x=np.zeros((2, 3), dtype=np.float32), y=np.zeros(2, dtype=np.int32))


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_model_forward_and_opacus_compatible(name: str) -> None:
    task = tasks()[name]
    torch.manual_seed(0)
    model = task.build_model()
    out = model(torch.randn(5, *task.input_shape))
    assert out.shape == (5, task.num_classes)
    assert ModuleValidator.validate(model, strict=True) == []
    assert task.architecture


def test_input_schema_is_json() -> None:
    task = get_task("breast-cancer")
    data = federate(task, 3, "iid")
    schema = json.loads(json.dumps(task.input_schema(data.normalization)))
    assert schema["shape"] == [30] and schema["dtype"] == "float32"
    assert schema["feature_names"] == task.feature_names
    assert schema["class_names"] == task.class_names
    assert len(schema["normalization"]["mean"]) == 30
    assert get_task("digits").input_schema({})["feature_names"][9] == "pixel_1_1"


# --- partitioning -----------------------------------------------------------------------------


@pytest.mark.parametrize("partitioner", PARTITIONERS)
@pytest.mark.parametrize("name", SMALL_TASKS)
def test_partitions_disjoint_and_cover_pool(name: str, partitioner: str) -> None:
    task = tasks()[name]
    pool, _ = load_raw(task)
    plan = plan_partitions(task, 4, partitioner, classes_per_node=2)  # type: ignore[arg-type]
    assert plan.test_index is not None
    parts = np.concatenate(plan.partitions)
    assert len(np.unique(parts)) == len(parts)  # disjoint
    assert not set(parts.tolist()) & set(plan.test_index.tolist())
    train = set(range(len(pool))) - set(plan.test_index.tolist())
    if partitioner == "pathological":
        assert set(parts.tolist()) <= train  # classes no node draws are left out
    else:
        assert set(parts.tolist()) == train
    data = federate(task, 4, partitioner, classes_per_node=2)  # type: ignore[arg-type]
    assert len(data.partitions) == 4 and all(len(p) > 0 for p in data.partitions)
    for part, index in zip(data.partitions, plan.partitions, strict=True):
        np.testing.assert_array_equal(part.y, pool.y[index])
        assert part.x.dtype == np.float32 and part.x.shape[1:] == task.input_shape


def test_stratified_test_split() -> None:
    task = get_task("digits")
    data = federate(task, 5, "iid", test_fraction=0.2)
    assert len(data.test) == 360
    counts = np.bincount(data.test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_predefined_test_set_is_used() -> None:
    task = _available("fashion-mnist")
    plan = plan_partitions(task, 3, "iid")
    assert plan.test_index is None and len(plan.train_index) == 60000
    np.testing.assert_array_equal(plan.train_index, np.arange(60000))


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_deterministic_per_seed(partitioner: str) -> None:
    task = get_task("digits")
    first = federate(task, 5, partitioner, seed=7)  # type: ignore[arg-type]
    _plan_lru.cache_clear()  # recompute from scratch, not from the in-process cache
    again = federate(task, 5, partitioner, seed=7)  # type: ignore[arg-type]
    _assert_same(first, again)
    other = federate(task, 5, partitioner, seed=8)  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        _assert_same(first, other)


def test_dirichlet_more_skewed_than_iid() -> None:
    task = get_task("digits")

    def mean_entropy(data: FederatedData) -> float:
        return float(np.mean([_entropy(p.y, task.num_classes) for p in data.partitions]))

    iid = mean_entropy(federate(task, 10, "iid"))
    skewed = mean_entropy(federate(task, 10, "dirichlet", alpha=0.1))
    assert skewed < iid - 0.5
    assert iid > 0.95 * np.log(10)


@pytest.mark.parametrize("classes_per_node", [1, 2, 3])
def test_pathological_classes_per_node(classes_per_node: int) -> None:
    data = federate(get_task("digits"), 10, "pathological", classes_per_node=classes_per_node)
    assert [len(np.unique(p.y)) for p in data.partitions] == [classes_per_node] * 10


@pytest.mark.parametrize("name", ["breast-cancer", "basic-motions"])
def test_normalization_from_test_set(name: str) -> None:
    task = get_task(name)
    data = federate(task, 3, "iid")
    channels = task.input_shape[0]
    assert len(data.normalization["mean"]) == len(data.normalization["std"]) == channels
    axes = tuple(a for a in range(data.test.x.ndim) if a != 1)
    np.testing.assert_allclose(data.test.x.mean(axis=axes), 0.0, atol=1e-4)
    np.testing.assert_allclose(data.test.x.std(axis=axes), 1.0, atol=1e-3)
    pool, _ = load_raw(task)
    plan = plan_partitions(task, 3, "iid")
    assert plan.test_index is not None
    raw_test = pool.x[plan.test_index]
    np.testing.assert_allclose(data.normalization["mean"], raw_test.mean(axis=axes), rtol=1e-4)


def test_digits_standardized_per_pixel_with_a_floor() -> None:
    data = federate(get_task("digits"), 2, "iid")
    std = np.asarray(data.normalization["std"])
    assert std.shape == (64,) and std.min() >= 0.1
    # statistics come from the held-out test set: it is centred, the node data only roughly
    assert np.abs(data.test.x.mean(axis=0)).max() < 1e-5


def test_federated_arrays_do_not_alias_cache() -> None:
    task = get_task("digits")
    data = federate(task, 2, "iid")
    pristine = federate(task, 2, "iid").partitions[0].x.copy()
    data.partitions[0].x[:] = -99.0
    data.test.x[:] = -99.0
    assert np.array_equal(federate(task, 2, "iid").partitions[0].x, pristine)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_partitions": 0}, "num_partitions must be at least 1"),
        ({"num_partitions": 1500}, "cannot split 1437 training samples of task digits into 1500"),
        ({"num_partitions": 3, "alpha": 0.0}, "alpha must be greater than 0"),
        ({"num_partitions": 3, "alpha": -1.0}, "alpha must be greater than 0"),
        ({"num_partitions": 3, "partitioner": "zipf"}, "unknown partitioner 'zipf'"),
        (
            {"num_partitions": 3, "partitioner": "pathological", "classes_per_node": 0},
            "classes_per_node must be between 1 and 10",
        ),
        (
            {"num_partitions": 3, "partitioner": "pathological", "classes_per_node": 11},
            "classes_per_node must be between 1 and 10",
        ),
        ({"num_partitions": 3, "test_fraction": 1.0}, "test_fraction must be between 0 and 1"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        federate(get_task("digits"), **kwargs)  # type: ignore[arg-type]


def test_empty_partition_is_an_error() -> None:
    # 64 training recordings over 32 nodes: Dirichlet sampling always leaves some node empty.
    with pytest.raises(ValueError, match="nodes empty"):
        federate(get_task("basic-motions"), 32, "dirichlet", alpha=0.1)


def test_pathological_impossible_split_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="pathological split of task basic-motions") as info:
        federate(get_task("basic-motions"), 60, "pathological", classes_per_node=4)
    assert "\n" not in str(info.value)


def test_tiny_data_dirichlet_terminates() -> None:
    data = federate(get_task("basic-motions"), 16, "dirichlet", alpha=0.5)
    assert sum(len(p) for p in data.partitions) == 64
    assert min(len(p) for p in data.partitions) >= 1


def test_unknown_task_lists_choices() -> None:
    with pytest.raises(UnknownTaskError) as info:
        get_task("mnist")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith("unknown task 'mnist': choose one of ")
    for name in TASK_NAMES:
        assert name in message


def test_synthetic_tasks_have_the_requested_size() -> None:
    for parameters in (100_000, 1_000_000):
        model = get_task(f"synthetic-{parameters}").build_model()
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - parameters) / parameters < 0.001
    with pytest.raises(UnknownTaskError, match="1,000 to 50,000,000"):
        get_task("synthetic-10")
    with pytest.raises(UnknownTaskError, match="synthetic-<parameters>"):
        get_task("synthetic-many")


def test_breast_cancer_names_are_scikit_learns() -> None:
    """Written out so that describing the task loads no data: they must stay the data's own."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    task = get_task("breast-cancer")
    assert task.feature_names == [str(n) for n in data.feature_names]
    assert task.class_names == [str(n) for n in data.target_names]
    assert sorted(tasks()) == sorted(TASK_NAMES)
