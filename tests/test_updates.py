"""Closed-form updates (ALGORITHM.md §1.7-1.9) against float64 references written out here."""

from __future__ import annotations

import pytest
import torch

from alphaedit.config import EditConfig
from alphaedit.hooks import trace
from alphaedit.stats import CorpusSpec, StatsCache, second_moments
from alphaedit.stats.corpus import file_windows
from alphaedit.methods import METHODS, get_method
from alphaedit.methods.projection import projected_solve
from alphaedit.updates import (
    LayerStatistics,
    LowRankDelta,
    null_space_mask,
    null_space_projector,
)

from conftest import WIKITEXT

pytestmark = pytest.mark.usefixtures("single_thread")

D0, D, U = 12, 5, 3


def alphaedit_delta(K, R, stats, config):
    """AlphaEdit's closed form, as the registry's method computes it (projected by default)."""
    assert get_method("alphaedit").projects(config)
    return get_method("alphaedit").layer_update(K, R, stats, config)


def memit_delta(K, R, stats, config):
    return get_method(config.method).layer_update(K, R, stats, config)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_projector(d0: int, rank: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d0, d0, dtype=torch.float64, generator=_gen(seed)))
    basis = q[:, :rank]
    return basis @ basis.T


@pytest.fixture
def problem():
    """Random keys K [d0, u], residuals R [d, u], a PSD C0 and C_p, and a rank-7 projector, all float64."""
    g = _gen(0)
    K = torch.randn(D0, U, dtype=torch.float64, generator=g)
    R = torch.randn(D, U, dtype=torch.float64, generator=g)
    A = torch.randn(D0, 40, dtype=torch.float64, generator=g)
    C0 = A @ A.T / 40
    Kp = torch.randn(D0, 6, dtype=torch.float64, generator=g)
    Cp = Kp @ Kp.T
    P = _random_projector(D0, 7, seed=1)
    return K, R, C0, Cp, P


def _eq14(K, R, P, Cp, alpha):
    """Paper Eq. 14: Δ = R Kᵀ P (C_p P + K Kᵀ P + α I)⁻¹."""
    eye = torch.eye(K.shape[0], dtype=torch.float64)
    return R @ K.T @ P @ torch.linalg.inv(Cp @ P + K @ K.T @ P + alpha * eye)


@pytest.mark.parametrize("alpha", [10.0, 0.5])
def test_alphaedit_delta_equals_paper_eq14_in_float64(problem, alpha):
    K, R, _, Cp, P = problem
    stats = LayerStatistics(second_moment=None, projector=P.float(), preserved=Cp.float())
    config = EditConfig(l2_alpha=alpha, solve_dtype="float64")
    delta = alphaedit_delta(K.float(), R.float(), stats, config).dense()
    expected = _eq14(K.float().double(), R.float().double(), P.float().double(), Cp.float().double(), alpha)
    assert delta.shape == (D, D0) and delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), expected, rtol=1e-6, atol=1e-7)


def test_alphaedit_delta_float32_solve_matches_eq14(problem):
    K, R, _, Cp, P = problem
    stats = LayerStatistics(None, P.float(), Cp.float())
    delta = alphaedit_delta(K.float(), R.float(), stats, EditConfig()).dense()  # float32, α = 10
    torch.testing.assert_close(delta.double(), _eq14(K, R, P, Cp, 10.0), rtol=1e-4, atol=1e-6)


def test_alphaedit_delta_lies_in_the_projector_row_space(problem):
    # (P A + αI) X = P B  =>  X = P (B − A X) / α, so Δ = Xᵀ = Δ P exactly.
    K, R, _, Cp, P = problem
    delta = alphaedit_delta(K.float(), R.float(), LayerStatistics(None, P.float(), Cp.float()), EditConfig(solve_dtype="float64")).dense()
    eye = torch.eye(D0, dtype=torch.float64)
    assert (delta.double() @ (eye - P)).norm() < 1e-6 * delta.norm()


def test_alphaedit_without_projector_is_refused(problem):
    K, R, C0, Cp, _ = problem
    with pytest.raises(ValueError, match="projector"):
        alphaedit_delta(K.float(), R.float(), LayerStatistics(C0.float(), None, Cp.float()), EditConfig()).dense()


def test_memit_delta_equals_closed_form_and_ignores_preserved(problem):
    K, R, C0, Cp, _ = problem
    lam = 7.0
    config = EditConfig(method="memit", mom2_update_weight=lam)
    delta = memit_delta(K.float(), R.float(), LayerStatistics(C0.float(), None, Cp.float()), config).dense()
    Kf, Rf, C0f = K.float().double(), R.float().double(), C0.float().double()
    expected = Rf @ Kf.T @ torch.linalg.inv(lam * C0f + Kf @ Kf.T)
    torch.testing.assert_close(delta.double(), expected, rtol=1e-6, atol=1e-7)


def test_memit_seq_delta_adds_preserved_keys(problem):
    K, R, C0, Cp, _ = problem
    lam = 7.0
    stats = LayerStatistics(C0.float(), None, Cp.float())
    seq = memit_delta(K.float(), R.float(), stats, EditConfig(method="memit-seq", mom2_update_weight=lam)).dense()
    plain = memit_delta(K.float(), R.float(), stats, EditConfig(method="memit", mom2_update_weight=lam)).dense()
    Kf, Rf, C0f, Cpf = K.float().double(), R.float().double(), C0.float().double(), Cp.float().double()
    expected = Rf @ Kf.T @ torch.linalg.inv(lam * C0f + Cpf + Kf @ Kf.T)
    torch.testing.assert_close(seq.double(), expected, rtol=1e-6, atol=1e-7)
    assert (seq - plain).norm() > 1e-2 * plain.norm()


def test_memit_without_second_moment_is_refused(problem):
    K, R, _, Cp, P = problem
    with pytest.raises(ValueError, match="second moment"):
        memit_delta(K.float(), R.float(), LayerStatistics(None, P.float(), Cp.float()), EditConfig(method="memit")).dense()


def test_registry_and_what_each_method_reads():
    assert list(METHODS) == ["alphaedit", "emmet", "encore", "memit", "memit-seq", "prune", "rect"]  # discovered from methods/
    config = EditConfig()
    assert [METHODS[m].projects(config) for m in ("alphaedit", "memit", "memit-seq")] == [True, False, False]
    assert [METHODS[m].keeps_preserved(config) for m in ("alphaedit", "memit", "memit-seq")] == [True, False, True]
    projected = EditConfig(project=True)
    assert all(m.projects(projected) and m.keeps_preserved(projected) for m in METHODS.values())  # the switch works on any


def test_projection_on_any_method_is_alphaedits_solve(problem):
    K, R, C0, Cp, P = problem
    stats = LayerStatistics(C0.float(), P.float(), Cp.float())
    reference = projected_solve(K.float(), R.float(), stats, EditConfig()).dense()
    for name in METHODS:
        delta = get_method(name).layer_update(K.float(), R.float(), stats, EditConfig(method=name, project=True)).dense()
        assert torch.equal(delta, reference), name
    plain = get_method("memit").layer_update(K.float(), R.float(), stats, EditConfig(method="memit")).dense()
    assert (plain - reference).norm() > 1e-2 * reference.norm()


def test_null_space_projector_keeps_exactly_the_small_eigenvalues():
    q, _ = torch.linalg.qr(torch.randn(D0, D0, dtype=torch.float64, generator=_gen(3)))
    eigenvalues = torch.tensor([1e-5, 3e-4, 1e-3, 5e-3, 9e-3] + [0.05, 0.1, 0.5, 1, 2, 3, 4], dtype=torch.float64)
    C0 = q @ torch.diag(eigenvalues) @ q.T
    P, rank = null_space_projector(C0.float(), threshold=2e-2)
    P = P.double()
    assert rank == 5
    torch.testing.assert_close(P, P.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)
    assert abs(torch.trace(P).item() - 5) < 1e-4
    small, large = q[:, eigenvalues < 2e-2], q[:, eigenvalues >= 2e-2]
    assert (P @ large).abs().max() < 1e-5
    torch.testing.assert_close(P @ small, small, atol=1e-5, rtol=0)


def test_null_space_projector_is_empty_or_identity_at_the_extremes():
    A = torch.randn(D0, 30, generator=_gen(4))
    C0 = A @ A.T / 30
    P, rank = null_space_projector(C0, threshold=0.0)
    assert rank == 0 and P.abs().max() == 0
    P, rank = null_space_projector(C0, threshold=1e9)
    assert rank == D0
    torch.testing.assert_close(P, torch.eye(D0), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- real statistics

LAYER = 2
PRESERVED_TOKENS = 3000


@pytest.fixture(scope="module")
def real_stats(gpt2, tokenizer, tmp_path_factory):
    """C0 of a tiny GPT-2's W_out input over real wikitext, the very key vectors it averages, and edit keys.

    GPT-2's GELU is nearly linear at a fresh model's small pre-activations, so its keys concentrate on a
    (d+1)-dimensional subspace of the d0 = 2d key space: the near-null space AlphaEdit relies on.
    """
    model, layout = gpt2
    spec = CorpusSpec(corpus=str(WIKITEXT), tokens=PRESERVED_TOKENS, max_length=128)
    cache = StatsCache(tmp_path_factory.mktemp("stats-home"))
    C0 = second_moments(model, layout, tokenizer, [LAYER], spec, cache=cache, show_progress=False)[LAYER].moment
    path = layout.mlp_out_path(LAYER)
    keys = []
    for window in file_windows(str(WIKITEXT), tokenizer, PRESERVED_TOKENS + 400, 128):
        with torch.no_grad(), trace(model, inputs_of=[path]) as rec:
            model(input_ids=torch.tensor([window]))
        keys.append(rec.inputs[path][0].double())
    every = torch.cat(keys)
    K0 = every[:PRESERVED_TOKENS].T  # [d0, N], exactly the tokens C0 was computed from
    K1 = every[PRESERVED_TOKENS::50][:8].T  # [d0, 8] in-distribution keys of later text
    R = torch.randn(layout.hidden_size, K1.shape[1], dtype=torch.float64, generator=_gen(5))
    return C0, K0, K1, R


def _spectral_gap_threshold(C0: torch.Tensor) -> float:
    """The geometric mean of the two eigenvalues around the largest ratio gap of the spectrum."""
    ev = torch.linalg.eigvalsh(C0.double())
    i = int((ev[1:] / ev[:-1]).argmax())
    return float((ev[i] * ev[i + 1]).sqrt())


def _preserved_ratio(delta: torch.Tensor, K0: torch.Tensor) -> float:
    return ((delta.double() @ K0).norm() / (delta.double().norm() * K0.norm())).item()


def test_real_second_moment_is_the_mean_outer_product_of_the_preserved_keys(real_stats):
    C0, K0, _, _ = real_stats
    torch.testing.assert_close(C0, K0 @ K0.T / K0.shape[1], rtol=1e-5, atol=1e-9)


def test_alphaedit_update_leaves_real_preserved_keys_almost_unchanged(real_stats):
    C0, K0, K1, R = real_stats
    d0 = C0.shape[0]
    threshold = _spectral_gap_threshold(C0)
    P, rank = null_space_projector(C0, threshold)
    assert rank >= d0 // 4  # a sizeable null space remains for the edit

    empty = torch.zeros(d0, d0)
    config = EditConfig(l2_alpha=1e-3)  # keys have norm ~0.5 here: a small α lets the edit actually land
    delta = alphaedit_delta(K1.float(), R.float(), LayerStatistics(None, P, empty), config).dense()
    ridge = alphaedit_delta(K1.float(), R.float(), LayerStatistics(None, torch.eye(d0), empty), config).dense()

    # Since Δ = ΔP and P C0 P has eigenvalues < threshold:
    #   ‖Δ K0‖² = N tr(Δ P C0 P Δᵀ) < N threshold ‖Δ‖²  and  ‖K0‖² = N tr C0.
    bound = (threshold / torch.trace(C0.double())).sqrt().item()
    ratio = _preserved_ratio(delta, K0)
    assert ratio < bound < 0.05  # measured: ratio ≈ 0.016, bound ≈ 0.033
    # The same solve without the null-space constraint (P = I) disturbs the preserved keys >5x more.
    assert _preserved_ratio(ridge, K0) > 5 * ratio  # measured ≈ 0.2
    # ... while the edit itself still lands: most of R is reproduced on the edit keys.
    assert (delta.double() @ K1 - R).norm() < 0.5 * R.norm()


def test_alphaedit_update_has_no_component_along_preserved_directions_unlike_memit(real_stats):
    # MEMIT's Δ = R Kᵀ(λC0 + KKᵀ)⁻¹ is the C0-weighted least-norm fit, so its normalised ‖ΔK0‖ is as small
    # as AlphaEdit's; the difference is structural: AlphaEdit puts exactly nothing on the high-variance
    # eigenvectors of C0, MEMIT only damps them.
    C0, _, K1, R = real_stats
    d0 = C0.shape[0]
    threshold = _spectral_gap_threshold(C0)
    P, _ = null_space_projector(C0, threshold)
    eigenvalues, eigenvectors = torch.linalg.eigh(C0.double())
    preserved_dirs = eigenvectors[:, eigenvalues >= threshold]
    empty = torch.zeros(d0, d0)

    alpha = alphaedit_delta(K1.float(), R.float(), LayerStatistics(None, P, empty), EditConfig()).dense()
    memit = memit_delta(K1.float(), R.float(), LayerStatistics(C0.float(), None, empty), EditConfig(method="memit")).dense()

    def outside(delta: torch.Tensor) -> float:
        return ((delta.double() @ preserved_dirs).norm() / delta.double().norm()).item()

    assert outside(alpha) < 1e-5  # measured ≈ 4e-7 (float32 round-off)
    assert outside(memit) > 1e-2  # measured ≈ 0.1


def test_alphaedit_float64_solve_agrees_with_float32_on_real_statistics(real_stats):
    C0, _, K1, R = real_stats
    P, _ = null_space_projector(C0, _spectral_gap_threshold(C0))
    A = K1[:, :4].float()
    stats = LayerStatistics(None, P, A @ A.T)  # some preserved keys from an earlier batch
    for alpha in (10.0, 1e-3):
        d32 = alphaedit_delta(K1.float(), R.float(), stats, EditConfig(l2_alpha=alpha)).dense()
        d64 = alphaedit_delta(K1.float(), R.float(), stats, EditConfig(l2_alpha=alpha, solve_dtype="float64")).dense()
        assert (d32 - d64).norm() < 1e-4 * d64.norm()


def test_projector_rules_pick_the_documented_directions():
    eigenvalues = torch.tensor([0.001, 0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    assert null_space_mask(eigenvalues, 0.05, "absolute").tolist() == [True, True, False, False, False]
    assert null_space_mask(eigenvalues, 0.005, "relative").tolist() == [True, True, False, False, False]  # < 0.05
    # the top direction carries 10/11.111 = 90%: preserving 0.95 of the energy needs the top two
    assert null_space_mask(eigenvalues, 0.95, "energy").tolist() == [True, True, True, False, False]
    assert null_space_mask(eigenvalues, 0.5, "energy").tolist() == [True, True, True, True, False]
    assert null_space_mask(eigenvalues, 3, "rank").tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="projector rule"):
        null_space_mask(eigenvalues, 1, "fancy")


def test_low_rank_norm_equals_the_dense_frobenius_norm():
    generator = torch.Generator().manual_seed(0)
    delta = LowRankDelta(torch.randn(7, 3, generator=generator), torch.randn(11, 3, generator=generator))
    assert delta.norm() == pytest.approx(float(delta.dense().double().norm()), rel=1e-6)
    assert LowRankDelta(torch.zeros(7, 0), torch.zeros(11, 0)).norm() == 0.0
