"""The low-rank math on its own: exact against a float64 NumPy SVD, fast methods against exact."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from svdsweep.data import Splits
from svdsweep.models import build_model
from svdsweep.optim import lowrank
from svdsweep.optim._gradient_checks import host_norms

K = 9  # the rank of the experiment


# -- helpers ------------------------------------------------------------------


def with_spectrum(m: int, n: int, spectrum: np.ndarray, seed: int) -> np.ndarray:
    """A float64 m x n matrix with random singular vectors and the given singular values."""
    generator = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    u = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64)).Q
    matrix: np.ndarray = ((u * torch.from_numpy(spectrum)) @ v.T).numpy()
    return matrix


def numpy_best_rank_k(matrix: np.ndarray, k: int) -> np.ndarray:
    """The Eckart–Young optimum computed in float64 by NumPy: the reference."""
    u, s, vh = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    approx: np.ndarray = (u[:, :k] * s[:k]) @ vh[:k]
    return approx


def relative_error(approx: Tensor, reference: np.ndarray) -> float:
    return float(np.linalg.norm(approx.double().numpy() - reference) / np.linalg.norm(reference))


# The quality checks below run hundreds of float64 decompositions between torch ops: in
# torch, because alternating NumPy's and torch's BLAS thread pools is slow on few cores.


def energy_ratio(matrix: Tensor, approx: Tensor, k: int) -> float:
    """‖Ĝ_k‖² / ‖G_k‖² against a float64 SVD: 1 is optimal."""
    values = torch.linalg.svdvals(matrix.double())
    return float(approx.double().square().sum() / values[:k].square().sum())


def numerical_rank(matrix: Tensor) -> int:
    values = torch.linalg.svdvals(matrix.double())
    return int((values > 1e-5 * values[0]).sum())


FastMethod = Callable[[Tensor, int, torch.Generator], lowrank.LowRankResult]


def randomized(matrix: Tensor, rank: int, generator: torch.Generator) -> lowrank.LowRankResult:
    return lowrank.randomized_low_rank(matrix, rank, generator=generator)


def subspace_cold(matrix: Tensor, rank: int, generator: torch.Generator) -> lowrank.LowRankResult:
    return lowrank.subspace_low_rank(matrix, rank, None, generator=generator)


FAST_METHODS: dict[str, FastMethod] = {"randomized": randomized, "subspace-cold": subspace_cold}


def assert_quality(ratios: list[float]) -> None:
    """The documented bound: median ≥ 0.999 and worst ≥ 0.99 of the optimal energy."""
    assert statistics.median(ratios) >= 0.999, sorted(ratios)[:10]
    assert min(ratios) >= 0.99, sorted(ratios)[:10]
    # An orthogonal projection onto k directions cannot beat the optimum (float32 rounding aside).
    assert max(ratios) <= 1 + 1e-5


@pytest.fixture
def forbid_decompositions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes every matrix decomposition raise, to prove a path computes none."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decomposition was computed")

    for name in ("svd", "svdvals", "eigh", "qr"):
        monkeypatch.setattr(torch.linalg, name, forbidden)


# -- exact ----------------------------------------------------------------------

SHAPES = [(60, 20), (20, 60), (40, 40)]  # tall, wide, square


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "square"])
@pytest.mark.parametrize("k", [1, 5, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_equals_float64_numpy_svd(shape: tuple[int, int], k: int, dtype: torch.dtype) -> None:
    matrix = torch.from_numpy(np.random.default_rng(k).standard_normal(shape)).to(dtype)
    result = lowrank.exact_low_rank(matrix, k)
    reference = numpy_best_rank_k(matrix.double().numpy(), k)

    assert result.approx.dtype == dtype
    assert result.approx.shape == matrix.shape
    assert relative_error(result.approx, reference) < (1e-5 if dtype == torch.float32 else 1e-12)
    values = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(result.singular_values.double().numpy(), values[:k], rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "square"])
@pytest.mark.parametrize("k", [2, 4, 7])
def test_exact_on_rank_deficient_matrices(shape: tuple[int, int], k: int) -> None:
    rng = np.random.default_rng(k)
    true_rank = 4
    matrix_np = rng.standard_normal((shape[0], true_rank)) @ rng.standard_normal(
        (true_rank, shape[1])
    )
    matrix = torch.from_numpy(matrix_np).float()
    result = lowrank.exact_low_rank(matrix, k)

    assert relative_error(result.approx, numpy_best_rank_k(matrix_np, k)) < 1e-5
    assert numerical_rank(result.approx) == min(k, true_rank)
    if k >= true_rank:  # nothing to drop: the matrix comes back (up to rounding)
        assert relative_error(result.approx, matrix_np) < 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "square"])
def test_exact_with_repeated_singular_values_at_the_cut(shape: tuple[int, int]) -> None:
    # σ3 = σ4 = σ5: a best rank-3 approximation exists but is not unique, so compare
    # what every optimum shares: its energy, its residual, its rank and its spectrum.
    spectrum = np.array([6.0, 5.0, 3.0, 3.0, 3.0, 1.0, 0.5, 0.25])
    k = 3
    matrix = torch.from_numpy(with_spectrum(*shape, spectrum, seed=3)).float()
    approx = lowrank.exact_low_rank(matrix, k).approx.double()

    kept = float(approx.square().sum())
    residual = float((matrix.double() - approx).square().sum())
    assert kept == pytest.approx(float(np.square(spectrum[:k]).sum()), rel=1e-5)
    assert residual == pytest.approx(float(np.square(spectrum[k:]).sum()), rel=1e-5)
    assert numerical_rank(approx) == k
    np.testing.assert_allclose(
        np.linalg.svd(approx.numpy(), compute_uv=False)[:k], spectrum[:k], rtol=1e-5
    )


def test_exact_with_repeated_singular_values_away_from_the_cut() -> None:
    spectrum = np.array([4.0, 4.0, 2.0, 1.0, 1.0, 0.5])  # the cut at k=3 has a gap
    matrix_np = with_spectrum(50, 30, spectrum, seed=4)
    result = lowrank.exact_low_rank(torch.from_numpy(matrix_np).float(), 3)
    assert relative_error(result.approx, numpy_best_rank_k(matrix_np, 3)) < 1e-5


# -- fast methods: quality ---------------------------------------------------------


def decaying_matrices() -> Iterator[Tensor]:
    """Matrices of the MLP's shapes (and others) whose spectra decay like gradients'."""
    shapes = [(256, 784), (128, 256), (784, 256), (100, 100)]
    decays: list[Callable[[np.ndarray], np.ndarray]] = [
        lambda i: 1.0 / i,
        lambda i: 1.0 / i**2,
        lambda i: np.exp(-i / 10),
        # a strong rank-15 signal over a noise floor
        lambda i: np.where(i <= 15, 10.0 / i, 0.05),
    ]
    seed = 0
    for m, n in shapes:
        for decay in decays:
            seed += 1
            spectrum = decay(np.arange(1, min(m, n) + 1, dtype=np.float64))
            yield torch.from_numpy(with_spectrum(m, n, spectrum, seed)).float()


@pytest.mark.parametrize("method", FAST_METHODS)
def test_fast_methods_meet_the_quality_bound_on_decaying_spectra(method: str) -> None:
    approximate = FAST_METHODS[method]
    ratios = []
    for seed, matrix in enumerate(decaying_matrices()):
        result = approximate(matrix, K, torch.Generator().manual_seed(seed))
        assert result.approx.shape == matrix.shape
        assert result.approx.dtype == matrix.dtype
        assert numerical_rank(result.approx) <= K
        ratios.append(energy_ratio(matrix, result.approx, K))
    assert_quality(ratios)


def test_warm_subspace_meets_the_quality_bound_on_slowly_changing_matrices() -> None:
    generator = torch.Generator().manual_seed(0)
    ratios = []
    for shape in [(256, 784), (128, 256)]:
        spectrum = 1.0 / np.arange(1, min(shape) + 1, dtype=np.float64)
        matrix = torch.from_numpy(with_spectrum(*shape, spectrum, seed=7)).float()
        step_size = 0.05 * float(matrix.norm()) / float(np.sqrt(matrix.numel()))
        basis = None
        for _ in range(30):
            matrix = matrix + step_size * torch.randn(matrix.shape, generator=generator)
            result = lowrank.subspace_low_rank(matrix, K, basis, generator=generator)
            assert result.basis is not None
            assert result.basis.shape == (shape[1], max(K + 8, lowrank.MIN_BASIS_WIDTH))
            basis = result.basis
            ratios.append(energy_ratio(matrix, result.approx, K))
    assert_quality(ratios)


@pytest.fixture(scope="module")
def real_gradients(fashion_splits: Splits) -> list[dict[str, Tensor]]:
    """Weight gradients of the MLP over 30 Adam steps on real Fashion-MNIST images."""
    torch.manual_seed(0)
    model = build_model("mlp")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(30 * 128, generator=torch.Generator().manual_seed(0))
    sequence = []
    for batch in order.split(128):
        loss = F.cross_entropy(model(fashion_splits.train_x[batch]), fashion_splits.train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        sequence.append(
            {
                name: param.grad.detach().clone()
                for name, param in model.named_parameters()
                if param.grad is not None and param.grad.ndim == 2
            }
        )
        optimizer.step()
    return sequence


@pytest.mark.slow
@pytest.mark.parametrize("method", ["randomized", "subspace-warm", "subspace-cold"])
def test_fast_methods_meet_the_quality_bound_on_real_gradients(
    real_gradients: list[dict[str, Tensor]], method: str
) -> None:
    generator = torch.Generator().manual_seed(1)
    bases: dict[str, Tensor | None] = {}
    ratios = []
    for gradients in real_gradients:
        for name, grad in gradients.items():
            if method == "subspace-warm":
                result = lowrank.subspace_low_rank(grad, K, bases.get(name), generator=generator)
                bases[name] = result.basis
            else:
                result = FAST_METHODS[method](grad, K, generator)
            ratios.append(energy_ratio(grad, result.approx, K))
    assert len(ratios) == 30 * 3  # 3 weight matrices per step, the 10x128 head included
    assert_quality(ratios)


# -- fast methods: the Gram fallback and half precision ----------------------------


@pytest.mark.parametrize("shape", [(10, 128), (128, 10)])
@pytest.mark.parametrize("method", FAST_METHODS)
def test_gram_fallback_when_the_sketch_spans_the_space(
    shape: tuple[int, int], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # k + oversample = 17 >= 10: the fast methods take the eigh-of-the-Gram-matrix path
    # (no sketch, no QR, no SVD) and must still give the exact optimum.
    matrix = torch.from_numpy(np.random.default_rng(5).standard_normal(shape)).float()
    reference = numpy_best_rank_k(matrix.double().numpy(), K)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Gram fallback should need only eigh")

    monkeypatch.setattr(torch.linalg, "qr", forbidden)
    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    result = FAST_METHODS[method](matrix, K, torch.Generator().manual_seed(0))

    assert result.approx.shape == matrix.shape
    assert relative_error(result.approx, reference) < 1e-4
    values = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(result.singular_values.double().numpy(), values[:K], rtol=1e-4)


HALF_DTYPES = [torch.bfloat16, torch.float16]
ALL_METHODS: dict[str, FastMethod] = {
    "exact": lambda matrix, rank, generator: lowrank.exact_low_rank(matrix, rank),
    **FAST_METHODS,
}


@pytest.mark.parametrize("shape", [(64, 48), (10, 128)], ids=["sketch", "gram"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_half_precision_is_computed_in_float32(
    method: str, dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    approximate = ALL_METHODS[method]
    spectrum = 1.0 / np.arange(1, min(shape) + 1)
    matrix = torch.from_numpy(with_spectrum(*shape, spectrum, seed=6)).to(dtype)
    result = approximate(matrix, K, torch.Generator().manual_seed(0))
    in_float32 = approximate(matrix.float(), K, torch.Generator().manual_seed(0))

    assert result.approx.dtype == dtype
    # The same computation as on the float32 copy, rounded to the input's dtype at the end.
    assert torch.equal(result.approx, in_float32.approx.to(dtype))
    assert energy_ratio(matrix, result.approx, K) == pytest.approx(1.0, abs=1e-2)


# -- nothing to truncate -----------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 12), (12, 5), (7, 7)])
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.usefixtures("forbid_decompositions")
def test_rank_at_least_min_dimension_returns_the_matrix_without_decomposing(
    method: str, extra: int, shape: tuple[int, int]
) -> None:
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    original = matrix.clone()
    result = ALL_METHODS[method](matrix, min(shape) + extra, torch.Generator().manual_seed(0))
    assert torch.equal(result.approx, original)
    assert torch.equal(matrix, original)
    # The stand-in spectrum still yields the right captured energy: all of it.
    assert float(lowrank.captured_energy(result.singular_values, original.norm())) == (
        pytest.approx(1.0, rel=1e-6)
    )


# -- captured energy -----------------------------------------------------------------


def test_captured_energy_is_the_exact_fraction() -> None:
    spectrum = np.array([3.0, 2.0, 1.0, 0.5, 0.25])
    matrix = torch.from_numpy(with_spectrum(30, 20, spectrum, seed=8)).float()
    result = lowrank.exact_low_rank(matrix, 2)
    fraction = float(lowrank.captured_energy(result.singular_values, matrix.norm()))
    expected = float(np.square(spectrum[:2]).sum() / np.square(spectrum).sum())
    assert fraction == pytest.approx(expected, rel=1e-5)


def test_captured_energy_of_a_zero_matrix_is_one() -> None:
    result = lowrank.exact_low_rank(torch.zeros(20, 30), 3)
    assert torch.equal(result.approx, torch.zeros(20, 30))
    assert float(lowrank.captured_energy(result.singular_values, torch.zeros(()))) == 1.0


@pytest.mark.parametrize("seed", range(20))
def test_captured_energy_never_exceeds_one(seed: int) -> None:
    # A classifier head's gradient: 10 x 128 with rows summing to zero, so of rank 9.
    # Rank k = 9 keeps all of its energy; float32 rounding must not report more than all.
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(10, 128, generator=generator)
    grad = grad - grad.mean(dim=0, keepdim=True)
    norm = torch._foreach_norm([grad])[0]
    for approximate in ALL_METHODS.values():
        result = approximate(grad, K, generator)
        fraction = float(lowrank.captured_energy(result.singular_values, norm))
        assert 0.999 < fraction <= 1.0


# -- arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one_is_rejected(rank: int) -> None:
    matrix = torch.randn(20, 30)
    for call in (
        lambda: lowrank.exact_low_rank(matrix, rank),
        lambda: lowrank.randomized_low_rank(matrix, rank),
        lambda: lowrank.subspace_low_rank(matrix, rank, None),
    ):
        with pytest.raises(ValueError, match="rank"):
            call()


@pytest.mark.parametrize(("oversample", "power_iters"), [(-1, 1), (8, -1)])
def test_negative_knobs_are_rejected(oversample: int, power_iters: int) -> None:
    matrix = torch.randn(20, 30)
    with pytest.raises(ValueError, match="oversample and power_iters"):
        lowrank.randomized_low_rank(matrix, 3, oversample=oversample, power_iters=power_iters)
    with pytest.raises(ValueError, match="oversample and power_iters"):
        lowrank.subspace_low_rank(matrix, 3, None, oversample=oversample, power_iters=power_iters)


@pytest.mark.parametrize("shape", [(30,), (2, 3, 4)])
def test_non_matrices_are_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2D"):
        lowrank.exact_low_rank(torch.randn(shape), 1)


@pytest.mark.parametrize("method", ["randomized", "subspace"])
def test_out_receives_the_same_bits_even_when_it_is_the_input(method: str) -> None:
    matrix = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    low_rank = getattr(lowrank, f"{method}_low_rank")
    extra = {"basis": None} if method == "subspace" else {}
    expected = low_rank(matrix, 4, **extra, generator=torch.Generator().manual_seed(1))
    into = matrix.clone()
    written = low_rank(into, 4, **extra, generator=torch.Generator().manual_seed(1), out=into)
    assert written.approx is into
    assert torch.equal(into, expected.approx)
    half = matrix.half()  # computed in float32: the product cannot go straight into it
    fallback = low_rank(half, 4, **extra, generator=torch.Generator().manual_seed(1), out=half)
    assert fallback.approx is not half and fallback.approx.dtype == torch.float16


@pytest.mark.parametrize("failures", [1, 2], ids=["float64 retry", "svd fallback"])
@pytest.mark.parametrize("shape", [(256, 784), (128, 256)], ids=["sketched", "gram"])
def test_an_eigh_that_fails_to_converge_falls_back_to_the_same_projection(
    monkeypatch: pytest.MonkeyPatch, failures: int, shape: tuple[int, int]
) -> None:
    """LAPACK's syevd failed in a sweep (error 55814, k=106): the step must still be G_k."""
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(*shape, generator=generator)
    expected = lowrank.exact_low_rank(matrix, 106).approx
    real_eigh = torch.linalg.eigh
    calls = {"failed": 0}

    def flaky_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if calls["failed"] < failures:
            calls["failed"] += 1
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(gram)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    result = lowrank.subspace_low_rank(matrix, 106, None)
    assert calls["failed"] == failures
    assert torch.allclose(result.approx, expected, atol=1e-4)


@pytest.mark.parametrize("magnitude", [1e-200, 1e200])
@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
def test_float64_extremes_keep_the_right_energy_without_a_given_norm(
    method: str, magnitude: float
) -> None:
    """Squares of 1e-200 underflow float64: a plain norm reads 0 and the energy would say 1."""
    generator = torch.Generator().manual_seed(5)
    decay = torch.tensor([0.8**i for i in range(48)], dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(96, 48, generator=generator, dtype=torch.float64)).Q
    matrix = (left * decay) @ right.T * magnitude
    expected = float(decay[:4].square().sum() / decay.square().sum())
    if method == "exact":
        result = lowrank.exact_low_rank(matrix, 4)
    elif method == "randomized":
        result = lowrank.randomized_low_rank(matrix, 4, generator=generator)
    else:
        result = lowrank.subspace_low_rank(matrix, 4, None, generator=generator)
    assert float(result.energy) == pytest.approx(expected, rel=1e-3)
    assert torch.isfinite(result.approx).all()
    kept = torch.linalg.matrix_norm(result.approx / magnitude) ** 2
    assert float(kept) == pytest.approx(float(decay[:4].square().sum()), rel=1e-3)


def test_the_certificate_stays_a_lower_bound_on_a_large_gradient() -> None:
    """A float32 norm of a 16M-entry gradient read ~1e4 roundoffs low: 0.9896 certified as 0.991.

    The warm basis misses one direction that holds about 1 % of the top-9
    energy: the certificate must not claim 0.99 when the truth is below it.
    """
    generator = torch.Generator().manual_seed(0)
    size = 4096
    left = torch.linalg.qr(torch.randn(size, 40, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(size, 40, generator=generator, dtype=torch.float64)).Q
    missed = 0.0849**0.5
    matrix = (left[:, :8] @ right[:, :8].T + missed * left[:, 8:9] @ right[:, 8:9].T).float()
    basis = torch.cat([right[:, :8], right[:, 9:33]], dim=1).float()  # width 32, misses one
    (norm,), bad = host_norms([matrix])
    assert bad == []
    result = lowrank.subspace_low_rank(matrix, 9, basis, frobenius_norm=norm)
    optimum = float(torch.linalg.svdvals(matrix.double() @ right)[:9].square().sum())
    truth = float(torch.linalg.matrix_norm(result.approx.double()) ** 2) / optimum
    assert result.certificate <= truth + 1e-6
    assert truth >= lowrank.CERTIFIED_FRACTION
