"""`SVDGradient`: the torch.optim contract, projection rules, state, errors and diagnostics."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdsweep.data import Splits
from svdsweep.models import build_model
from svdsweep.optim import METHODS, NonFiniteGradientError, SVDGradient
from svdsweep.optim._gradient_checks import host_norms

K = 9


# -- helpers ------------------------------------------------------------------


def make_model(seed: int = 0) -> nn.Module:
    """The experiment's MLP: weights 1.weight (256x784), 3.weight (128x256), 5.weight (10x128)."""
    torch.manual_seed(seed)
    return build_model("mlp")


def make_optimizer(model: nn.Module, **kwargs: Any) -> SVDGradient:
    base = torch.optim.Adam(model.named_parameters(), lr=1e-3)
    return SVDGradient(base, **{"rank": K, **kwargs})


def batch(step: int, size: int = 64) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(size, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (size,), generator=generator)
    return images, labels


def backward(model: nn.Module, step: int = 0) -> Tensor:
    images, labels = batch(step)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return loss


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.grad is not None
    }


def params(model: nn.Module) -> dict[str, Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_same_tensors(left: dict[Any, Tensor], right: dict[Any, Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=0, equal_nan=True)


# References in float64 torch rather than NumPy: alternating NumPy's and torch's BLAS
# thread pools is slow on few cores.


def exact_rank_k(matrix: Tensor, k: int) -> Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    approx: Tensor = (u[:, :k] * s[:k]) @ vh[:k]
    return approx


def numerical_rank(matrix: Tensor) -> int:
    values = torch.linalg.svdvals(matrix.double())
    return int((values > 1e-5 * values[0]).sum())


def captured_fraction(matrix: Tensor, k: int) -> float:
    values = torch.linalg.svdvals(matrix.double())
    return float(values[:k].square().sum() / values.square().sum())


# -- torch.optim contract ---------------------------------------------------------


def test_shares_param_groups_with_the_base_optimizer() -> None:
    model = make_model()
    base = torch.optim.Adam(model.named_parameters(), lr=1e-3)
    optimizer = SVDGradient(base, rank=K)

    assert optimizer.param_groups is base.param_groups
    optimizer.param_groups[0]["lr"] = 0.25
    assert base.param_groups[0]["lr"] == 0.25
    base.param_groups[0]["lr"] = 0.5
    assert optimizer.param_groups[0]["lr"] == 0.5
    group = base.param_groups[0]
    assert (group["rank"], group["method"]) == (K, "subspace")  # "default" resolved
    assert (group["oversample"], group["power_iters"]) == (32 - K, 0)


def test_works_with_an_lr_scheduler() -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        # torch warns when the scheduler does not see optimizer.step() being called.
        warnings.simplefilter("error")
        for step in range(3):
            optimizer.zero_grad()
            backward(model, step)
            optimizer.step()
            scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 8)
    assert scheduler.get_last_lr() == [pytest.approx(1e-3 / 8)]


def test_step_with_closure_returns_the_loss_and_projects() -> None:
    model = make_model()
    optimizer = make_optimizer(model, method="exact")
    before = params(model)
    losses: list[Tensor] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = backward(model)
        losses.append(loss)
        return loss

    returned = optimizer.step(closure)  # type: ignore[arg-type]
    assert len(losses) == 1
    assert returned is losses[0]
    assert (
        isinstance(returned, Tensor) and returned.requires_grad
    )  # the closure ran with gradients enabled
    after = params(model)
    assert all(not torch.equal(before[name], after[name]) for name in before)
    for name, grad in grads(model).items():
        if grad.ndim == 2:
            assert numerical_rank(grad) <= K, name


def test_step_without_closure_returns_none() -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    backward(model)
    assert optimizer.step() is None


def test_zero_grad() -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    backward(model)
    optimizer.zero_grad()
    assert all(param.grad is None for param in model.parameters())
    backward(model)
    optimizer.zero_grad(set_to_none=False)
    assert all(param.grad is not None and not param.grad.any() for param in model.parameters())


def test_add_param_group_projects_new_params_with_their_own_rank() -> None:
    model = make_model()
    optimizer = make_optimizer(model, method="exact")
    torch.manual_seed(1)
    extra_default, extra_rank2 = nn.Linear(64, 32), nn.Linear(64, 32)
    # Named like the model's parameters: torch wants all groups named or none.
    optimizer.add_param_group({"params": list(extra_default.named_parameters(prefix="a"))})
    optimizer.add_param_group({"params": list(extra_rank2.named_parameters(prefix="b")), "rank": 2})

    base = optimizer.base_optimizer
    assert optimizer.param_groups is base.param_groups
    assert len(base.param_groups) == 3
    assert [group["rank"] for group in base.param_groups] == [K, K, 2]
    assert [group["method"] for group in base.param_groups] == ["exact"] * 3

    inputs = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    (extra_default(inputs).square().sum() + extra_rank2(inputs).square().sum()).backward()
    raw = {
        "default": extra_default.weight.grad.clone(),  # type: ignore[union-attr]
        "rank2": extra_rank2.weight.grad.clone(),  # type: ignore[union-attr]
        "bias": extra_rank2.bias.grad.clone(),  # type: ignore[union-attr]
    }
    weight_before = extra_rank2.weight.detach().clone()
    optimizer.step()

    assert extra_default.weight.grad is not None and extra_rank2.weight.grad is not None
    torch.testing.assert_close(
        extra_default.weight.grad.double(), exact_rank_k(raw["default"], K), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        extra_rank2.weight.grad.double(), exact_rank_k(raw["rank2"], 2), rtol=1e-4, atol=1e-5
    )
    assert torch.equal(extra_rank2.bias.grad, raw["bias"])  # type: ignore[arg-type]
    assert not torch.equal(extra_rank2.weight, weight_before)  # the base optimizer stepped it


def test_add_param_group_rejects_bad_settings_without_adding_the_group() -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    with pytest.raises(ValueError, match="rank"):
        optimizer.add_param_group({"params": list(nn.Linear(4, 4).parameters()), "rank": 0})
    assert len(optimizer.base_optimizer.param_groups) == 1


@pytest.mark.parametrize("reshape_conv", [False, True])
def test_conv_kernels_are_projected_only_with_reshape_conv(reshape_conv: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16 * 6 * 6, 20))
    base = torch.optim.Adam(model.named_parameters(), lr=1e-3)
    optimizer = SVDGradient(base, rank=2, method="exact", reshape_conv=reshape_conv)
    model(
        torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ).square().sum().backward()
    raw = grads(model)
    optimizer.step()
    after = grads(model)

    kernel, raw_kernel = after["0.weight"], raw["0.weight"]
    assert kernel.shape == (16, 3, 3, 3)
    if reshape_conv:
        torch.testing.assert_close(
            kernel.reshape(16, 27).double(),
            exact_rank_k(raw_kernel.reshape(16, 27), 2),
            rtol=1e-4,
            atol=1e-5,
        )
    else:
        assert torch.equal(kernel, raw_kernel)
    # Linear weights are projected either way; biases never are.
    assert numerical_rank(after["2.weight"]) == 2
    assert torch.equal(after["0.bias"], raw["0.bias"])
    assert torch.equal(after["2.bias"], raw["2.bias"])


# -- which gradients are touched ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_weight_gradients_are_projected_and_biases_left_alone(method: str) -> None:
    model = make_model()
    optimizer = make_optimizer(model, method=method)
    backward(model)
    raw = grads(model)
    optimizer.step()
    after = grads(model)
    for name in raw:
        if raw[name].ndim == 1:
            assert torch.equal(after[name], raw[name]), name
        else:
            assert numerical_rank(after[name]) <= K, name
            if method == "exact":
                torch.testing.assert_close(
                    after[name].double(), exact_rank_k(raw[name], K), rtol=1e-4, atol=1e-6
                )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [4, 6, 100])
def test_rank_at_least_min_dimension_is_a_no_op(
    method: str, rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decomposition was computed")

    for name in ("svd", "svdvals", "eigh", "qr"):
        monkeypatch.setattr(torch.linalg, name, forbidden)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4))  # min dimension 4
    reference = copy.deepcopy(model)
    optimizer = SVDGradient(torch.optim.Adam(model.parameters(), lr=1e-2), rank, method)
    plain_adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for step in range(3):
        inputs = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, optimizer), (reference, plain_adam)):
            opt.zero_grad()
            net(inputs).square().sum().backward()
        raw = grads(model)
        optimizer.step()
        plain_adam.step()
        assert_same_tensors(grads(model), raw)  # bit-identical gradients
    assert_same_tensors(params(model), params(reference))  # exactly plain Adam
    assert optimizer.energy_fractions() == {}


# -- state ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["subspace", "randomized"])
def test_state_dict_round_trip_continues_bit_identically(method: str) -> None:
    first, total = 4, 8

    uninterrupted = make_model()
    optimizer = make_optimizer(uninterrupted, method=method, seed=1)
    train_steps(uninterrupted, optimizer, range(total))

    interrupted = make_model()
    optimizer = make_optimizer(interrupted, method=method, seed=1)
    train_steps(interrupted, optimizer, range(first))
    buffer = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    # A fresh process: other initial weights, another sketch seed; the load must fix both.
    resumed = make_model(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = make_optimizer(resumed, method=method, seed=999)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert resumed_optimizer.param_groups is resumed_optimizer.base_optimizer.param_groups
    train_steps(resumed, resumed_optimizer, range(first, total))

    final, expected = params(resumed), params(uninterrupted)
    for name in expected:
        assert torch.equal(final[name], expected[name]), name

    # The check has teeth: without the projection state the run takes another path.
    no_projection_state = make_model()
    no_projection_state.load_state_dict(saved["model"])
    base_only = make_optimizer(no_projection_state, method=method, seed=999)
    base_only.base_optimizer.load_state_dict(saved["optimizer"]["base"])
    train_steps(no_projection_state, base_only, range(first, total))
    other = params(no_projection_state)
    assert not all(torch.equal(other[name], expected[name]) for name in expected)


def test_state_dict_holds_bases_for_the_subspace_method() -> None:
    model = make_model()
    optimizer = make_optimizer(model, method="subspace")
    train_steps(model, optimizer, range(2))
    state = optimizer.state_dict()
    # 1.weight (index 0) and 3.weight (index 2) have warm-start bases; the 10x128 head
    # takes the Gram path and keeps none.
    assert sorted(state["projection_state"]) == [0, 2, 4]
    assert state["projection_state"][0]["basis"].shape == (784, 32)  # max(k + 8, 32) columns
    assert state["projection_state"][2]["basis"].shape == (256, 32)
    assert "basis" not in state["projection_state"][4]


def test_load_state_dict_rejects_a_plain_optimizer_state_dict() -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    with pytest.raises(ValueError, match="SVDGradient state dict"):
        optimizer.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


# -- bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "9", None])
def test_bad_rank_is_rejected(rank: Any) -> None:
    with pytest.raises(ValueError, match="rank"):
        SVDGradient(torch.optim.Adam(make_model().parameters()), rank=rank)


@pytest.mark.parametrize("method", ["svd", "EXACT", "", None])
def test_unknown_method_is_rejected(method: Any) -> None:
    with pytest.raises(ValueError, match="method"):
        SVDGradient(torch.optim.Adam(make_model().parameters()), rank=K, method=method)


@pytest.mark.parametrize("knob", ["oversample", "power_iters"])
@pytest.mark.parametrize("value", [-1, 1.5, True, "8"])
def test_bad_accuracy_knobs_are_rejected(knob: str, value: Any) -> None:
    with pytest.raises(ValueError, match=knob):
        SVDGradient(torch.optim.Adam(make_model().parameters()), rank=K, **{knob: value})


@pytest.mark.parametrize("policy", ["ignore", "RAISE", None])
def test_bad_nonfinite_policy_is_rejected(policy: Any) -> None:
    with pytest.raises(ValueError, match="nonfinite"):
        SVDGradient(torch.optim.Adam(make_model().parameters()), rank=K, nonfinite=policy)


def test_base_optimizer_must_be_an_optimizer() -> None:
    with pytest.raises(TypeError, match="base_optimizer"):
        SVDGradient(make_model().parameters(), rank=K)  # type: ignore[arg-type]


# -- non-finite gradients ------------------------------------------------------------------


def snapshot(model: nn.Module, optimizer: SVDGradient) -> dict[str, Any]:
    base_state = optimizer.base_optimizer.state_dict()["state"]
    return {
        "params": params(model),
        "grads": grads(model),
        "base": {
            f"{index}.{key}": value.clone()
            for index, state in base_state.items()
            for key, value in state.items()
        },
        "bases": {
            f"{index}": state["basis"].clone()
            for index, state in optimizer.state_dict()["projection_state"].items()
            if "basis" in state
        },
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for part in ("params", "grads", "base", "bases"):
        assert_same_tensors(after[part], before[part])


@pytest.mark.parametrize(("name", "value"), [("3.weight", float("nan")), ("5.bias", float("inf"))])
def test_nonfinite_gradient_raises_naming_the_parameter_and_changes_nothing(
    name: str, value: float
) -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, range(2))  # so that Adam moments and bases exist
    optimizer.zero_grad()
    backward(model, step=2)
    dict(model.named_parameters())[name].grad.view(-1)[0] = value  # type: ignore[union-attr]
    before = snapshot(model, optimizer)

    with pytest.raises(NonFiniteGradientError) as raised:
        optimizer.step()

    message = str(raised.value)
    assert name in message
    assert all(other not in message for other in ("1.weight", "5.weight", "3.bias"))
    assert isinstance(raised.value, ValueError)
    assert_unchanged(before, snapshot(model, optimizer))
    assert optimizer.base_optimizer.state_dict()["state"][0]["step"] == 2


def test_nonfinite_gradient_without_names_gives_position_and_shape() -> None:
    model = make_model()
    optimizer = SVDGradient(torch.optim.Adam(model.parameters()), rank=K)
    backward(model)
    model[3].weight.grad[0, 0] = float("nan")  # type: ignore[index]
    with pytest.raises(NonFiniteGradientError, match=r"param 2 \(shape 128x256\)"):
        optimizer.step()


def test_nonfinite_skip_skips_the_step_and_counts_it() -> None:
    model = make_model()
    optimizer = make_optimizer(model, nonfinite="skip")
    train_steps(model, optimizer, range(2))
    optimizer.zero_grad()
    losses: list[Tensor] = []

    def poisoned_closure() -> Tensor:
        loss = backward(model, step=2)
        model[1].weight.grad[0, 0] = float("nan")  # type: ignore[index]
        losses.append(loss)
        return loss

    loss = optimizer.step()  # nothing to skip yet: gradients are None after zero_grad
    assert loss is None and optimizer.skipped_steps == 0
    before = snapshot(model, optimizer)
    returned = optimizer.step(poisoned_closure)  # type: ignore[arg-type]

    assert returned is losses[0]
    assert optimizer.skipped_steps == 1
    before["grads"] = {}  # the closure made the (poisoned) gradients
    after = snapshot(model, optimizer)
    after["grads"] = {}
    assert_unchanged(before, after)

    train_steps(model, optimizer, range(3, 4))  # a finite step goes through
    assert optimizer.skipped_steps == 1
    assert not torch.equal(params(model)["1.weight"], before["params"]["1.weight"])
    assert optimizer.state_dict()["skipped_steps"] == 1
    fresh = make_optimizer(make_model(), nonfinite="skip")
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.skipped_steps == 1


@pytest.mark.parametrize(
    ("dtype", "magnitude"),
    [
        (torch.float32, 1.0),
        (torch.float32, 1e-20),  # squares underflow float32 (subnormal): the sum loses digits
        (torch.float32, 1e-23),  # squares are 0 in float32: a float32 norm says 0
        (torch.float32, 1e20),  # squares overflow float32: a float32 norm says inf
        (torch.float16, 1e3),  # finite fp16 entries whose norm is beyond fp16
        (torch.bfloat16, 1e30),
        (torch.float64, 1e-200),
        (torch.float64, 1e-302),  # the largest entry is below 1e-300
        (torch.float64, 1e200),
    ],
)
def test_gradient_norms_are_right_at_every_magnitude(dtype: torch.dtype, magnitude: float) -> None:
    """No norm may be passed off underflowed (0) or overflowed (inf), nor lose digits."""
    grads = [
        (
            torch.randn(64, 96, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            * magnitude
        ).to(dtype)
        for seed in range(3)
    ]
    grads.append(torch.zeros(5, dtype=dtype))
    values, bad = host_norms(grads)
    assert bad == []
    for grad, value in zip(grads, values, strict=True):
        peak = float(grad.double().abs().max())  # scaled, so that 1e200 squares in float64
        exact = peak * float(torch.linalg.vector_norm(grad.double() / peak)) if peak else 0.0
        assert value == pytest.approx(exact, rel=1e-5, abs=0.0)


def test_gradient_norms_flag_nan_and_inf_but_not_large_finite_ones() -> None:
    finite_large = torch.full((8, 8), 1e20)
    grads = [torch.ones(3), finite_large, torch.tensor([1.0, float("nan")])]
    grads.append(torch.tensor([float("inf"), 0.0], dtype=torch.float16))
    values, bad = host_norms(grads)
    assert bad == [2, 3]
    assert values[1] == pytest.approx(8e20, rel=1e-6)


def test_empty_and_all_padding_sparse_gradients_step() -> None:
    """A 0-element parameter and an Embedding(sparse=True) batch of padding only have norm 0."""
    embedding = nn.Embedding(10, 4, sparse=True, padding_idx=0)
    empty = nn.Parameter(torch.zeros(0, 3))
    matrix = nn.Parameter(torch.randn(16, 12))
    optimizer = SVDGradient(
        torch.optim.SGD([*embedding.parameters(), empty, matrix], lr=0.1), rank=2
    )
    (embedding(torch.zeros(5, dtype=torch.long)).sum() + (matrix**2).sum()).backward()
    empty.grad = torch.zeros(0, 3)
    assert embedding.weight.grad is not None and embedding.weight.grad._nnz() == 0
    before = matrix.detach().clone()
    optimizer.step()
    assert not torch.equal(matrix.detach(), before)
    values, bad = host_norms([embedding.weight.grad, empty.grad])
    assert values == [0.0, 0.0] and bad == []


@pytest.mark.parametrize("magnitude", [1e-306, 1e-310])
def test_float64_gradients_near_the_bottom_of_the_range_step(magnitude: float) -> None:
    """Norms below float64's normal range once overflowed the power-of-two scale."""
    layer = nn.Linear(32, 24, bias=False).double()
    optimizer = SVDGradient(torch.optim.SGD(layer.parameters(), lr=1.0), rank=4)
    layer.weight.grad = torch.randn(24, 32, dtype=torch.float64) * magnitude
    optimizer.step()
    assert torch.isfinite(layer.weight).all()
    energy = optimizer.energy_fractions()["param 0 (shape 24x32)"]
    assert 0.0 < energy <= 1.0


# -- energy diagnostics ----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_energy_fractions_are_the_captured_energy(method: str, fashion_splits: Splits) -> None:
    model = make_model()
    optimizer = make_optimizer(model, method=method)
    for step in range(3):
        optimizer.zero_grad()
        rows = slice(step * 128, (step + 1) * 128)
        F.cross_entropy(
            model(fashion_splits.train_x[rows]), fashion_splits.train_y[rows]
        ).backward()
        raw = grads(model)
        optimizer.step()
        fractions = optimizer.energy_fractions()

        assert set(fractions) == {"1.weight", "3.weight", "5.weight"}
        assert all(0 < value <= 1 for value in fractions.values()), fractions
        for name, value in fractions.items():
            optimum = captured_fraction(raw[name], K)
            if method == "exact":
                assert value == pytest.approx(optimum, rel=1e-5), name
            else:
                assert 0.99 * optimum <= value <= optimum * (1 + 1e-5), name
    tensors = optimizer.energy_tensors()
    assert all(isinstance(value, Tensor) and value.ndim == 0 for value in tensors.values())
