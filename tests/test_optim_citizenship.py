"""`SVDGradient` as a `torch.optim` citizen: each behaviour checked as torch's own optimizers do it.

The first half covers what issue 12 found broken (copies, OneCycleLR, second and
nested wrappers, closure-requiring bases, sparse gradients, a base loaded on its
own, state-dict hooks, stale diagnostics); the second half pins what already
held (bases, compiled models, tied weights, save/load, hooks, sync-free mode).
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdsweep.optim import NonFiniteGradientError, SVDGradient

K = 3


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)
    )


def batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 24, generator=generator), torch.randint(0, 4, (32,), generator=generator)


def loss_of(model: nn.Module, step: int) -> Tensor:
    images, labels = batch(step)
    return F.cross_entropy(model(images), labels)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()


def params(model: nn.Module) -> list[Tensor]:
    return [param.detach().clone() for param in model.parameters()]


def assert_identical(left: list[Tensor], right: list[Tensor]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def rank_of(matrix: Tensor) -> int:
    values = torch.linalg.svdvals(matrix.double())
    return int((values > 1e-5 * values[0]).sum())


# -- what issue 12 found broken --------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_steps_exactly_like_the_original(how: str) -> None:
    model = mlp()
    optimizer = SVDGradient(torch.optim.Adam(model.parameters(), lr=1e-2), rank=K)
    train(model, optimizer, range(3))
    if how == "deepcopy":
        model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    else:
        model_copy, optimizer_copy = pickle.loads(pickle.dumps((model, optimizer)))

    train(model, optimizer, range(3, 6))
    train(model_copy, optimizer_copy, range(3, 6))  # raised AttributeError: base_optimizer

    assert_identical(params(model), params(model_copy))
    assert optimizer_copy.param_groups is optimizer_copy.base_optimizer.param_groups
    assert optimizer_copy.param_groups is not optimizer.param_groups


def test_one_cycle_lr_drives_the_wrapped_adam() -> None:
    model = mlp()
    optimizer = SVDGradient(torch.optim.Adam(model.parameters(), lr=1e-3), rank=K)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    rates, betas = [], []
    for step in range(5):
        train(model, optimizer, range(step, step + 1))
        scheduler.step()
        rates.append(optimizer.base_optimizer.param_groups[0]["lr"])
        betas.append(optimizer.base_optimizer.param_groups[0]["betas"][0])
    # Up to max_lr at 30 % of the cycle, then down; beta1 (momentum) moves the other way.
    assert rates[0] < max(rates) == pytest.approx(0.1) and rates[-1] < max(rates)
    assert min(betas) == pytest.approx(0.85) and betas[-1] > min(betas)


def test_a_second_wrapper_on_the_same_base_uses_its_own_settings() -> None:
    model = mlp()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    SVDGradient(base, rank=2, method="exact")
    second = SVDGradient(base, rank=5, method="randomized")
    assert {(g["rank"], g["method"]) for g in base.param_groups} == {(5, "randomized")}
    second.zero_grad()
    loss_of(model, 0).backward()
    second.step()
    assert rank_of(model[1].weight.grad) == 5


def test_a_wrapper_around_a_wrapper_projects_once_at_the_outer_rank() -> None:
    model = mlp()
    inner = SVDGradient(torch.optim.Adam(model.parameters(), lr=1e-2), rank=2)
    outer = SVDGradient(inner, rank=5)
    assert outer.base_optimizer is inner.base_optimizer
    outer.zero_grad()
    loss_of(model, 0).backward()
    outer.step()
    assert rank_of(model[1].weight.grad) == 5


def test_a_group_keeps_its_own_rank_under_a_second_wrapper() -> None:
    model = mlp()
    base = torch.optim.Adam(
        [{"params": model[1].parameters(), "rank": 2}, {"params": model[3].parameters()}], lr=1e-2
    )
    SVDGradient(base, rank=4)
    SVDGradient(base, rank=6)
    assert [group["rank"] for group in base.param_groups] == [2, 6]


def test_lbfgs_gets_projected_gradients_at_every_closure_evaluation() -> None:
    model = mlp()
    optimizer = SVDGradient(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), rank=K)
    evaluations: list[int] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        evaluations.append(1)
        return loss

    first = loss_of(model, 0).item()
    returned = optimizer.step(closure)  # raised TypeError: missing 'closure'
    assert isinstance(returned, Tensor)
    assert len(evaluations) > 1
    assert rank_of(model[1].weight.grad) <= K  # the last evaluation's gradient, projected
    assert loss_of(model, 0).item() < first


@pytest.mark.parametrize("base_class", [torch.optim.SGD, torch.optim.Adagrad])
def test_sparse_gradients_pass_through_untouched(base_class: type) -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 8, sparse=True)
    linear = nn.Linear(8, 6)
    optimizer = SVDGradient(
        base_class([*embedding.parameters(), *linear.parameters()], lr=0.1), rank=2
    )
    tokens = torch.randint(0, 50, (20,))
    linear(embedding(tokens)).square().sum().backward()
    sparse_before = embedding.weight.grad.clone()
    weight_before = embedding.weight.detach().clone()

    optimizer.step()  # raised RuntimeError: addmm, after projecting the linear gradient

    assert embedding.weight.grad.is_sparse
    torch.testing.assert_close(embedding.weight.grad.to_dense(), sparse_before.to_dense())
    assert rank_of(linear.weight.grad) == 2
    assert not torch.equal(embedding.weight.detach(), weight_before)


def test_a_sparse_gradient_reaches_sgd_untouched_next_to_a_projected_one() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 8, sparse=True)
    linear = nn.Linear(8, 6)
    optimizer = SVDGradient(
        torch.optim.SGD([*linear.parameters(), *embedding.parameters()], lr=0.1), rank=2
    )
    linear(embedding(torch.randint(0, 50, (20,)))).square().sum().backward()
    reference = nn.Parameter(embedding.weight.detach().clone())
    reference.grad = embedding.weight.grad.clone()

    optimizer.step()
    torch.optim.SGD([reference], lr=0.1).step()  # the same sparse gradient, no wrapper

    assert rank_of(linear.weight.grad) == 2
    assert embedding.weight.grad.is_sparse
    assert_identical([embedding.weight.detach()], [reference.detach()])
    assert optimizer.state.get(embedding.weight, {}) == {}


def test_lbfgs_takes_a_sparse_gradient_it_densifies() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(20, 6, sparse=True)
    linear = nn.Linear(6, 5)
    base = torch.optim.LBFGS([*linear.parameters(), *embedding.parameters()], max_iter=3)
    optimizer = SVDGradient(base, rank=2)
    tokens = torch.randint(0, 20, (10,))

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = linear(embedding(tokens)).square().mean()
        loss.backward()
        return loss

    before = embedding.weight.detach().clone()
    optimizer.step(closure)
    assert rank_of(linear.weight.grad) == 2
    assert not torch.equal(embedding.weight.detach(), before)


def test_sparse_adam_takes_a_sparse_gradient_and_refuses_a_dense_one_up_front() -> None:
    embedding = nn.Embedding(10, 4, sparse=True)
    linear = nn.Linear(4, 6)
    optimizer = SVDGradient(
        torch.optim.SparseAdam([*linear.parameters(), *embedding.parameters()]), rank=2
    )
    linear(embedding(torch.tensor([1, 2]))).sum().backward()
    grad_before = linear.weight.grad.clone()
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"):
        optimizer.step()
    torch.testing.assert_close(linear.weight.grad, grad_before, rtol=0, atol=0)

    only_sparse = SVDGradient(torch.optim.SparseAdam(embedding.parameters()), rank=2)
    before = embedding.weight.detach().clone()
    only_sparse.step()
    assert not torch.equal(embedding.weight.detach(), before)


@pytest.mark.parametrize("sync_every", [1, 4])
def test_adam_refuses_a_sparse_gradient_before_anything_is_modified(sync_every: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)  # before the embedding: Adam would create its state first
    embedding = nn.Embedding(50, 8, sparse=True)
    base = torch.optim.Adam([*linear.parameters(), *embedding.parameters()], lr=0.1)
    optimizer = SVDGradient(base, rank=2, sync_every=sync_every)
    linear(torch.randn(4, 8)).square().sum().backward()
    optimizer.step()  # one dense-only step: state to keep
    optimizer.zero_grad()
    linear(embedding(torch.randint(0, 50, (20,)))).square().sum().backward()
    models = [*linear.parameters(), *embedding.parameters()]
    params_before = [param.detach().clone() for param in models]
    grads_before = [param.grad.clone() for param in models]
    base_state_before = copy.deepcopy(base.state_dict())
    own_state_before = {param: copy.deepcopy(entry) for param, entry in optimizer.state.items()}

    with pytest.raises(RuntimeError, match=r"Adam does not support sparse gradients \(param 2"):
        optimizer.step()

    assert_identical([param.detach() for param in models], params_before)
    for param, before in zip(models, grads_before, strict=True):
        assert param.grad.is_sparse == before.is_sparse
        torch.testing.assert_close(param.grad.to_dense(), before.to_dense(), rtol=0, atol=0)
    base_state = base.state_dict()
    assert base_state["state"].keys() == base_state_before["state"].keys()
    for index, entry in base_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, base_state_before["state"][index][key])
    assert optimizer.state.keys() == own_state_before.keys()
    for param, entry in own_state_before.items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(optimizer.state[param][key]), torch.as_tensor(value))


def test_a_sparse_nan_is_caught_before_anything_changes() -> None:
    embedding = nn.Embedding(10, 4, sparse=True)
    linear = nn.Linear(4, 6)
    optimizer = SVDGradient(
        torch.optim.SGD([*embedding.parameters(), *linear.parameters()], lr=0.1), rank=2
    )
    linear(embedding(torch.tensor([1, 2]))).sum().backward()
    embedding.weight.grad = torch.sparse_coo_tensor([[1]], [[float("nan")] * 4], (10, 4))
    grad_before = linear.weight.grad.clone()
    with pytest.raises(NonFiniteGradientError):
        optimizer.step()
    torch.testing.assert_close(linear.weight.grad, grad_before, rtol=0, atol=0)


def test_loading_the_base_directly_keeps_the_groups_shared() -> None:
    model = mlp()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer = SVDGradient(base, rank=K)
    train(model, optimizer, range(2))
    base.load_state_dict(base.state_dict())  # replaces base.param_groups with a new list

    assert optimizer.param_groups is base.param_groups
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = params(model)
    train(model, optimizer, range(2, 4))
    assert_identical(params(model), before)


def test_state_dict_hooks_fire() -> None:
    model = mlp()
    optimizer = SVDGradient(torch.optim.Adam(model.parameters()), rank=K)
    calls: list[str] = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("save pre"))

    def post(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append("save post")
        return {**state_dict, "note": "added by a hook"}

    optimizer.register_state_dict_post_hook(post)
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load post"))
    train(model, optimizer, range(1))
    saved = optimizer.state_dict()
    optimizer.load_state_dict(saved)
    assert saved["note"] == "added by a hook"
    assert calls == ["save pre", "save post", "load pre", "load post"]


def test_energy_fractions_drop_a_parameter_without_a_gradient() -> None:
    model = mlp()
    optimizer = SVDGradient(torch.optim.SGD(model.parameters(), lr=0.0), rank=K)
    train(model, optimizer, range(1))
    assert len(optimizer.energy_fractions()) == 3
    optimizer.zero_grad()
    loss_of(model, 1).backward()
    model[3].weight.grad = None
    optimizer.step()
    names = optimizer.energy_fractions()
    assert len(names) == 2 and not any("16x12" in name or "12x16" in name for name in names)
    assert len(optimizer.certificates()) == 3  # the last certificate of each is kept


# -- what already held, and must keep holding --------------------------------------------


@pytest.mark.parametrize(
    "make_base",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.RMSprop(p, lr=1e-3),
        lambda p: torch.optim.Adagrad(p, lr=1e-2),
        lambda p: torch.optim.NAdam(p, lr=1e-2),
        lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    ],
    ids=["SGD", "AdamW", "RMSprop", "Adagrad", "NAdam", "fused Adam"],
)
def test_torch_optimizers_as_bases(make_base: Any) -> None:
    model = mlp()
    optimizer = SVDGradient(make_base(model.parameters()), rank=K)
    first = loss_of(model, 0).item()
    for _ in range(5):
        train(model, optimizer, range(1))
        assert rank_of(model[1].weight.grad) <= K
    assert loss_of(model, 0).item() < first


def test_muon_as_base_on_matrices() -> None:
    model = mlp()
    matrices = [param for param in model.parameters() if param.ndim == 2]
    optimizer = SVDGradient(torch.optim.Muon(matrices, lr=0.02), rank=K)
    before = params(model)
    train(model, optimizer, range(2))
    assert rank_of(model[1].weight.grad) <= K
    assert not torch.equal(params(model)[0], before[0])


def test_compiled_model_trains_like_the_eager_one() -> None:
    eager, compiled_source = mlp(), mlp()
    compiled = torch.compile(compiled_source)
    eager_optimizer = SVDGradient(torch.optim.Adam(eager.parameters(), lr=1e-2), rank=K)
    compiled_optimizer = SVDGradient(torch.optim.Adam(compiled.parameters(), lr=1e-2), rank=K)
    train(eager, eager_optimizer, range(3))
    train(compiled, compiled_optimizer, range(3))
    for a, b in zip(params(eager), params(compiled_source), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_tied_weight_is_projected_once() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(12, 8)
    head = nn.Linear(8, 12, bias=False)
    head.weight = embedding.weight  # tied
    optimizer = SVDGradient(
        torch.optim.SGD(nn.ModuleList([embedding, head]).parameters(), lr=0.0), rank=2
    )
    tokens = torch.randint(0, 12, (16,))
    F.cross_entropy(head(embedding(tokens)), tokens).backward()
    optimizer.step()
    assert len(optimizer.param_groups[0]["params"]) == 1
    assert sum(optimizer.diagnostics()["escalations"].values()) == 1
    assert rank_of(embedding.weight.grad) == 2


def test_save_and_load_with_weights_only_continue_bit_identically() -> None:
    model = mlp()
    optimizer = SVDGradient(torch.optim.Adam(model.parameters(), lr=1e-2), rank=K)
    train(model, optimizer, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, range(3, 6))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = mlp(seed=1)
    restored.load_state_dict(saved["model"])
    restored_optimizer = SVDGradient(torch.optim.Adam(restored.parameters(), lr=1e-2), rank=K)
    restored_optimizer.load_state_dict(saved["optimizer"])
    train(restored, restored_optimizer, range(3, 6))
    assert_identical(params(restored), params(model))
    assert restored_optimizer.diagnostics() == optimizer.diagnostics()


def test_step_hooks_run_around_the_projection() -> None:
    model = mlp()
    optimizer = SVDGradient(torch.optim.Adam(model.parameters()), rank=K)
    seen: list[int] = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(rank_of(model[1].weight.grad))
    )
    optimizer.register_step_post_hook(
        lambda opt, args, kwargs: seen.append(rank_of(model[1].weight.grad))
    )
    train(model, optimizer, range(1))
    assert seen[0] > K and seen[1] == K


# -- the sync-free mode, run on the CPU -------------------------------------------------


def test_sync_free_mode_trains_like_the_certified_mode() -> None:
    """Same model and data: the deferred checks change nothing while gradients are finite."""
    losses = {}
    for sync_every in (1, 4):
        model = mlp()
        optimizer = SVDGradient(
            torch.optim.Adam(model.parameters(), lr=1e-2), rank=K, sync_every=sync_every
        )
        train(model, optimizer, range(12))
        losses[sync_every] = loss_of(model, 99).item()
        diagnostics = optimizer.diagnostics()
        assert diagnostics["skipped_steps"] == 0
    assert losses[4] == pytest.approx(losses[1], rel=0.05)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_sync_free_mode_undoes_a_nonfinite_step_and_reports_it_at_the_read(policy: str) -> None:
    model = mlp()
    optimizer = SVDGradient(
        torch.optim.Adam(model.parameters(), lr=1e-2), rank=K, sync_every=3, nonfinite=policy
    )
    train(model, optimizer, range(3))  # read at step 3: all finite
    before = params(model)
    state_before = copy.deepcopy(optimizer.base_optimizer.state_dict())
    optimizer.zero_grad()
    loss_of(model, 3).backward()
    model[1].weight.grad[0, 0] = float("nan")
    optimizer.step()  # no host read: the step is folded and undone on the device
    assert_identical(params(model), before)
    state_after = optimizer.base_optimizer.state_dict()["state"]
    for index, entry in state_before["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(state_after[index][key], value, rtol=0, atol=0)
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match="sync_every=3"):
            optimizer.synchronize()
    else:
        assert optimizer.diagnostics()["skipped_steps"] == 1


def test_sync_free_mode_restarts_a_basis_whose_certificate_fell_short() -> None:
    param = nn.Parameter(torch.zeros(64, 64))
    optimizer = SVDGradient(torch.optim.SGD([param], lr=0.0), rank=4, sync_every=2)
    generator = torch.Generator().manual_seed(0)
    left, right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :32] = torch.randn(64, 32, generator=generator)
    right[:, 32:] = torch.randn(64, 32, generator=generator)
    for gradient in (left, right):
        param.grad = gradient.clone()
        optimizer.step()
    assert optimizer.diagnostics()["uncertified_steps"] >= 1
    assert "basis" not in optimizer.state[param]  # the next step starts cold


def test_a_group_of_another_rank_gets_that_ranks_default_basis() -> None:
    model = mlp()
    optimizer = SVDGradient(torch.optim.Adam([model[1].weight], lr=1e-3), rank=3)
    optimizer.add_param_group({"params": [model[3].weight], "rank": 40})
    optimizer.add_param_group({"params": [model[5].weight], "rank": 2, "oversample": 5})
    assert [group["oversample"] for group in optimizer.param_groups] == [29, 8, 5]
