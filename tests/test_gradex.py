"""GradEx math on a tiny real Llama with LoRA adapters (engine/gradex.py, no Ray): the spec's
checkable facts, then the estimators and the selection rules on known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysift.engine import gradex as gx
from raysift.engine import lm

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "import numpy as np\nx = np.zeros(3)",
    "Debian package for molecular dynamics simulations.",
    "I feel much better after the flu shot today!",
    "A short one.",
    "Fortune: you will write many tests.",
]


@pytest.fixture(scope="module")
def theta_star(tiny_lm):
    """The tiny Llama with LoRA adapters moved off their zero init (B = 0 would make every
    gradient through A vanish): a stand-in for a meta-initialisation."""
    model, tokenizer = lm.load_lm(str(tiny_lm))
    model = lm.with_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return model, tokenizer


def _batch(tokenizer, texts, max_length=24):
    return lm.collate([lm.encode_text(tokenizer, t, max_length) for t in texts],
                      tokenizer.pad_token_id)  # fmt: skip


def _gradient_model(model, k=16, seed=3):
    projector = gx.Projector(gx.GradientModel.adapter_shapes(model), k, seed)
    return gx.GradientModel(model, projector, chunk=4)


def test_softplus_of_minus_logit_is_the_cross_entropy(theta_star):
    model, tokenizer = theta_star
    batch = _batch(tokenizer, TEXTS)
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z, y = z[:, :-1].double(), batch["labels"][:, 1:]
    keep = y != lm.IGNORE
    logit = gx.token_logits(z, y.clamp(min=0))
    ce = torch.nn.functional.cross_entropy(z.transpose(1, 2), y, ignore_index=lm.IGNORE,
                                           reduction="none")  # fmt: skip
    assert torch.allclose(torch.nn.functional.softplus(-logit)[keep], ce[keep], rtol=0, atol=1e-10)
    # the reference's clipped form agrees where p is inside the clip
    clipped = gx.token_logits(z, y.clamp(min=0), clip=1e-12)
    assert torch.allclose(clipped[keep], logit[keep], atol=1e-6)


def test_blockwise_projection_equals_the_dense_one(theta_star):
    model, tokenizer = theta_star
    gm = _gradient_model(model)
    batch = _batch(tokenizer, TEXTS)
    f0, G = gm.sample_gradients(batch)
    P = gm.projector.dense()
    assert P.shape == (gm.projector.d, 16) and set(np.unique(P * 4)) == {-1.0, 1.0}
    names = list(gm.projector.shapes)
    params = dict(model.named_parameters())
    for b in range(len(TEXTS)):  # autograd, one sample at a time, flattened in the block order
        for n in names:
            params[n].requires_grad_(True)
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        n_tok = int((labels != lm.IGNORE).sum())
        z = model(input_ids=ids[None, :n_tok]).logits[0, :-1].float()
        f = gx.token_logits(z, labels[1:n_tok]).mean()
        grads = torch.autograd.grad(f, [params[n] for n in names])
        flat = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
        assert f0[b] == pytest.approx(float(f), abs=1e-5)
        np.testing.assert_allclose(G[b], flat @ P, rtol=1e-4, atol=1e-6)
    # the same seed gives the same P, whatever order the blocks are asked for in
    again = gx.Projector(dict(reversed(list(gm.projector.shapes.items()))), 16, 3)
    np.testing.assert_array_equal(again.dense(), P)


def test_token_gradients_match_autograd(theta_star):
    model, tokenizer = theta_star
    gm = _gradient_model(model)
    ex = lm.encode_text(tokenizer, TEXTS[2], 24)
    [(f0, G)] = gm.token_gradients([ex])
    assert f0.shape == (len(ex.input_ids) - 1,) and G.shape == (len(f0), 16)
    P = gm.projector.dense()
    params = dict(model.named_parameters())
    names = list(gm.projector.shapes)
    z = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
    logits = gx.token_logits(z, torch.tensor(ex.labels[1:]))
    for t in (0, len(f0) - 1):
        grads = torch.autograd.grad(logits[t], [params[n] for n in names], retain_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
        np.testing.assert_allclose(G[t], flat @ P, rtol=1e-4, atol=1e-6)
    # softplus(-f0) over the tokens is the text's loss at theta*
    batch = _batch(tokenizer, [TEXTS[2]])
    assert gx.softplus(-f0).mean() == pytest.approx(gm.loss_at(None, [batch]), rel=1e-5)


def test_linear_and_functional_estimates_of_a_small_step_agree(theta_star):
    model, tokenizer = theta_star
    gm = _gradient_model(model, k=32)
    ex = [lm.encode_text(tokenizer, t, 24) for t in TEXTS]
    parts = gm.token_gradients(ex)
    target = gx.TargetGradients(np.concatenate([p[0] for p in parts]),
                                np.concatenate([p[1] for p in parts]))  # fmt: skip
    batch = _batch(tokenizer, TEXTS)
    base = gm.loss_at(None, [batch])
    assert target.base_loss() == pytest.approx(base, rel=1e-5)
    w = target.G.mean(axis=0)  # raise the target logits: the loss has to move
    w *= 0.02 * gm.adapter_norm() / np.sqrt(w @ gm.projector.gram() @ w)  # |P w| = 2% of theta*
    linear = float(target.loss(w[None])[0])
    functional = gm.loss_at(w, [batch])
    assert abs(functional - base) > 1e-4  # the step does move the loss
    assert linear == pytest.approx(functional, rel=1e-3)


def _toy_sources(n_sources=6, per=20, k=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_sources, k))
    G = np.concatenate([c + 0.3 * rng.standard_normal((per, k)) for c in centres])
    f0 = rng.normal(-1.0, 0.5, len(G))
    source = np.repeat(np.arange(n_sources), per)
    return gx.SourceGradients(f0, G, source, [f"s{i}" for i in range(n_sources)]), centres


def test_reference_weights_are_the_gradient_sum_at_small_C():
    grads, _ = _toy_sources()
    subsets = gx.sample_subsets(grads.n_sources, 5, 3, seed=1)
    W = gx.reference_weights(grads, subsets, C=1e-4, seed=2)
    # the sum over the rows the regression trains on (the first 80% of the subset's rows)
    sums = np.array([G[: int(len(G) * 0.8)].sum(0) for G in (grads.G[grads.rows_of(s)]
                                                              for s in subsets)])  # fmt: skip
    cos = (W * sums).sum(1) / np.linalg.norm(W, axis=1) / np.linalg.norm(sums, axis=1)
    assert cos.min() >= 0.99
    # reference_fast is that limit over all of the subset's rows, from per-source sums
    fast = gx.reference_fast_weights(grads, subsets)
    np.testing.assert_allclose(fast, [grads.G[grads.rows_of(s)].sum(0) for s in subsets])
    # and the logistic regression is solved: liblinear's objective has zero gradient at b
    X, y = grads.G[:50], (np.arange(50) % 3 > 0).astype(int)
    b = gx.fit_liblinear_lr(X, y, C=0.5)
    Xb, ys = np.hstack([X, np.ones((50, 1))]), np.where(y > 0, 1.0, -1.0)
    grad = b - 0.5 * Xb.T @ (ys * gx.sigmoid(-ys * (Xb @ b)))
    assert np.abs(grad).max() < 1e-8


def test_offset_is_the_minimiser_of_the_linearised_objective():
    grads, _ = _toy_sources()
    f0, G, lam = grads.f0, grads.G, 0.1
    w = gx.fit_offset(f0, G, lam)
    grad = -(G.T @ gx.sigmoid(-(f0 + G @ w))) / len(G) + lam * w
    assert np.abs(grad).max() < 1e-9
    # against scipy-free brute force: no random direction lowers the objective
    obj = lambda v: gx.softplus(-(f0 + G @ v)).mean() + lam / 2 * v @ v  # noqa: E731
    rng = np.random.default_rng(0)
    assert all(obj(w + 1e-3 * rng.standard_normal(len(w))) > obj(w) for _ in range(20))


def test_same_seed_same_subsets_same_estimates():
    grads, _ = _toy_sources()
    target = gx.TargetGradients(
        np.full(30, -1.0), np.random.default_rng(5).standard_normal((30, 12))
    )
    a = gx.sample_subsets(grads.n_sources, 12, 3, seed=7)
    b = gx.sample_subsets(grads.n_sources, 12, 3, seed=7)
    np.testing.assert_array_equal(a, b)
    assert len({r.tobytes() for r in a}) == 12 and (a.sum(1) == 3).all()
    assert not np.array_equal(a, gx.sample_subsets(grads.n_sources, 12, 3, seed=8))
    la = target.loss(gx.offset_weights(grads, a, 0.1))
    lb = target.loss(gx.offset_weights(grads, b, 0.1))
    np.testing.assert_array_equal(la, lb)
    # asking for more subsets than exist returns each one once
    assert len(gx.sample_subsets(4, 100, 2, seed=0)) == 6


def test_selection_rules_recover_the_helpful_sources():
    """Target tokens whose gradients point along sources 0 and 1: fine-tuning on those raises the
    target logits, so every rule must rank them first."""
    grads, centres = _toy_sources()
    rng = np.random.default_rng(3)
    tg = np.concatenate([centres[0] + 0.1 * rng.standard_normal((20, 12)),
                         centres[1] + 0.1 * rng.standard_normal((20, 12))])  # fmt: skip
    target = gx.TargetGradients(np.full(40, -1.0), tg)
    subsets = gx.sample_subsets(grads.n_sources, 20, 3, seed=0)
    losses = target.loss(gx.offset_weights(grads, subsets, 0.5))
    scores = gx.ensemble_scores(subsets, losses)
    assert set(np.argsort(scores)[:2]) == {0, 1}
    _, theta = gx.surrogate(subsets, losses)
    assert set(np.argsort(theta)[:2]) == {0, 1}

    def estimate(mask):
        return float(target.loss(gx.offset_weights(grads, mask[None], 0.5))[0])

    mask, trace = gx.forward_selection(np.argsort(scores), estimate)
    assert mask[0] == 1 and mask[1] == 1
    assert all(b <= a for a, b in zip(trace[:-1], trace[1:], strict=True))


def test_validation_metrics_and_trivial_predictors():
    real = np.array([2.0, 2.2, 2.1, 2.5, 2.4])
    v = gx.Validation(estimated=real * 0.9 + 0.05, real=real, base_loss=2.6).metrics()
    assert v["estimator"]["spearman"] == pytest.approx(1.0)
    assert v["estimator"]["pearson"] == pytest.approx(1.0)
    assert v["constant"]["spearman"] is None and v["constant"]["pearson"] is None
    assert v["loss_at_theta_star"]["mean_relative_error"] == pytest.approx(
        float(np.mean(np.abs(2.6 - real) / real))
    )
    assert gx.spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(
        0.9486832980505138
    )
    with pytest.raises(ValueError, match="k must be > 0"):
        gx.Projector({"a": (2, 2)}, 0, 0)


def test_surrogate_recovers_additive_effects_up_to_their_mean():
    rng = np.random.default_rng(0)
    theta = rng.normal(0, 1, 8)
    subsets = gx.sample_subsets(8, 40, 4, seed=1)
    losses = 3.0 + subsets @ theta
    b, fitted = gx.surrogate(subsets, losses)
    np.testing.assert_allclose(fitted, theta - theta.mean(), atol=1e-10)
    np.testing.assert_allclose(b + subsets @ fitted, losses, atol=1e-10)
