"""LESS's math on a tiny real Llama with LoRA (engine/less.py, the feature actor's class called in
this process, no Ray): the spec's checks -- batched features equal a per-example autograd loop
with the checkpoint's moments, the moments belong to the right parameters, the score equals a
dense computation -- and the checkpoint weights follow the schedule actually used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysift.actors.gradients import LessFeatures
from raysift.engine import less, lm
from raysift.engine.gradex import GradientModel, Projector
from raysift.jobs.core.storage import Store
from raysift.jobs.finetune import epoch_state_name, save_epoch_state
from raysift.jobs.methods.less import load_state

from .test_gradex import TEXTS as GRADEX_TEXTS

TEXTS = [*GRADEX_TEXTS, "def f(x):\n    return x + 1"]
LORA = {"r": 4, "alpha": 16.0, "dropout": 0.0, "modules": ["q_proj", "v_proj"]}
K = 24


@pytest.fixture(scope="module")
def warmed(tiny_lm, tmp_path_factory):
    """A few AdamW steps of a LoRA fine-tune of the tiny Llama (real moments), saved as an epoch
    state the way the fine-tune stage saves it; the optimiser itself is returned too."""
    folder = tmp_path_factory.mktemp("less")
    model, tok = lm.load_lm(str(tiny_lm))
    model = lm.with_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0,
                         target_modules=LORA["modules"])  # fmt: skip
    torch.manual_seed(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.02, weight_decay=0.0)
    batch = lm.collate([lm.encode_text(tok, t, 24) for t in TEXTS], tok.pad_token_id)
    for _ in range(5):
        nll, n = lm.token_nll(model, batch)
        (nll / n).backward()
        opt.step()
        opt.zero_grad()
    store = Store.local(folder)
    save_epoch_state(store, "epochs", model, opt, step=5, per_epoch=5)
    return model, tok, opt, store, folder


def _actor(tiny_lm, store, k=K, chunk=3):
    return LessFeatures(str(tiny_lm), LORA, [f"epochs/{epoch_state_name(1)}"], store,
                        {"candidates": "c", "targets": "t"}, k, seed=7, max_length=24,
                        chunk=chunk)  # fmt: skip


def _loop_gradients(model, tok, text: str) -> dict:
    """One example at a time, plain autograd on HF's own `.loss` (mean token cross-entropy)."""
    model.eval()
    ids = torch.tensor([lm.encode_text(tok, text, 24).input_ids])
    loss = model(input_ids=ids, labels=ids).loss
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
    return dict(zip(names, grads, strict=True))


def test_batched_features_equal_a_per_example_autograd_loop(warmed, tiny_lm):
    model, tok, opt, store, _ = warmed
    actor = _actor(tiny_lm, store)
    state = load_state(store, f"epochs/{epoch_state_name(1)}")
    P = actor.model.projector.dense()  # rows in the projector's (sorted) parameter order
    names = list(actor.model.projector.shapes)
    got = {side: actor.features(TEXTS, side)[:, 0] for side in ("candidates", "targets")}
    b1, b2 = less.BETAS
    for i, text in enumerate(TEXTS):
        g = _loop_gradients(model, tok, text)
        m = {n: state["moments"][n][0] for n in names}
        v = {n: state["moments"][n][1] for n in names}
        # Adam without bias correction, the epsilon inside the root (the reference's code)
        gamma = {n: (b1 * m[n] + (1 - b1) * g[n]) / torch.sqrt(b2 * v[n] + (1 - b2) * g[n] ** 2
                                                               + 1e-8) for n in names}  # fmt: skip
        for side, vec in (("candidates", gamma), ("targets", g)):
            flat = torch.cat([vec[n].reshape(-1) for n in names]).double().numpy()
            want = flat @ P
            want /= np.linalg.norm(want)
            err = np.linalg.norm(got[side][i] - want) / np.linalg.norm(want)
            # the projection sums d float32 products (threaded, in no fixed order): its rounding
            # is ~sqrt(d) x 6e-8; measured up to 2.5e-6 on an AMD EPYC (AVX-512), run to run.
            assert err < 1e-5, (side, i, err)
    # the unprojected Gamma too, elementwise, batched (vmap in chunks of 3) vs the loop
    batch = lm.collate([lm.encode_text(tok, t, 24) for t in TEXTS], tok.pad_token_id)
    _, grads = actor.model.sample_grads(batch)
    gamma = less.adam_transform(grads, state["moments"])
    for i, text in enumerate(TEXTS):
        g = _loop_gradients(model, tok, text)
        for n in names:
            want = (b1 * state["moments"][n][0] + (1 - b1) * g[n]) / torch.sqrt(
                b2 * state["moments"][n][1] + (1 - b2) * g[n] ** 2 + 1e-8
            )
            err = float((gamma[n][i] - want).norm() / want.norm())
            # float32, threaded reductions in no fixed order: measured up to 1.0e-6 run to run
            # on an idle machine, 5.4e-6 with other jobs on its 2 cores (other thread splits);
            # rounding only: the bound stays orders of magnitude below a changed beta or moment
            assert err < 2e-5, (n, i, err)


def test_the_moments_are_the_right_parameters(warmed):
    model, _, opt, store, _ = warmed
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = load_state(store, f"epochs/{epoch_state_name(1)}")["moments"]
    by_index = less.moments_from_state_dict(opt.state_dict(), [n for n, _ in named])
    assert set(saved) == set(by_index) == {n for n, _ in named}
    for n, p in named:  # by object, by index, and as saved: the same tensors
        assert torch.equal(saved[n][0], opt.state[p]["exp_avg"])
        assert torch.equal(saved[n][1], opt.state[p]["exp_avg_sq"])
        assert torch.equal(by_index[n][0], saved[n][0])
    shapes = {n: tuple(p.shape) for n, p in named}
    less.check_moments(saved, shapes)
    # a mapping through the wrong order (the state dict read in reverse) is caught by shape:
    # lora_A (r x in) and lora_B (out x r) alternate
    wrong = less.moments_from_state_dict(opt.state_dict(), [n for n, _ in named][::-1])
    with pytest.raises(ValueError, match="moments of shape"):
        less.check_moments(wrong, shapes)


def test_scores_equal_a_dense_computation():
    rng = np.random.default_rng(0)
    n, m, C, k = 40, 9, 3, 16
    F = less.normalise(rng.normal(size=(n, C, k)))
    G = less.normalise(rng.normal(size=(m, C, k)))
    w = less.checkpoint_weights([3.0, 2.0, 1.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])  # unequal groups
    got = less.scores(F, G, w, groups)
    want = np.empty(n)
    for z in range(n):
        per = {}
        for t in range(m):
            s = sum(w[i] * float(np.dot(F[z, i], G[t, i])) for i in range(C))
            per.setdefault(groups[t], []).append(s)
        want[z] = max(np.mean(v) for v in per.values())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    one = less.scores(F, G, w, None)
    np.testing.assert_allclose(
        one, [np.mean([sum(w[i] * F[z, i] @ G[t, i] for i in range(C)) for t in range(m)])
              for z in range(n)], rtol=1e-6, atol=1e-7)  # fmt: skip


def test_features_with_the_projection_matrix_score_as_dense_numpy(warmed, tiny_lm):
    """Real features through the real projection: the score equals numpy on the dense P."""
    _, tok, _, store, _ = warmed
    actor = _actor(tiny_lm, store)
    F = actor.features(TEXTS[:5], "candidates")
    G = actor.features(TEXTS[5:], "targets")
    assert F.shape == (5, 1, K) and np.allclose(np.linalg.norm(F, axis=-1), 1, atol=1e-6)
    dense = (F[:, 0] @ G[:, 0].T).mean(axis=1)
    np.testing.assert_allclose(less.scores(F, G, np.ones(1), None), dense, rtol=1e-6)


def test_features_do_not_depend_on_the_batch(warmed, tiny_lm):
    _, _, _, store, _ = warmed
    a = _actor(tiny_lm, store, chunk=7).features(TEXTS, "candidates")
    b = np.concatenate([_actor(tiny_lm, store, chunk=1).features(TEXTS[i : i + 2], "candidates")
                        for i in range(0, len(TEXTS), 2)])  # fmt: skip
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_checkpoint_weights_follow_the_schedule_used():
    """The epochs' mean learning rates, from the fine-tune stage's LambdaLR as it steps."""
    per_epoch, total, warmup, peak = 7, 28, 2, 0.01
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lm.lr_factor(s, total, warmup))
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [np.mean(used[e * per_epoch : (e + 1) * per_epoch]) for e in range(4)]
    got = less.epoch_learning_rates(per_epoch, total, warmup, peak)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    w = less.checkpoint_weights(got)
    assert w.sum() == pytest.approx(1.0) and w[0] > w[-1]  # linear decay: early epochs weigh more
    with pytest.raises(ValueError):
        less.checkpoint_weights([0.0, 0.0])


def test_gradient_model_rejects_an_unknown_loss(warmed):
    model = warmed[0]
    with pytest.raises(ValueError, match="loss must be one of"):
        GradientModel(model, Projector(GradientModel.adapter_shapes(model), 4, 0), loss="sum")


def test_projection_columns_are_near_orthogonal(warmed):
    """The blocks' random bits are balanced and the columns of P nearly orthogonal: P^T P has
    d / k on its diagonal and off-diagonal entries of order sqrt(d) / k (a bit source that
    repeated bytes or fixed bits would fail this)."""
    model = warmed[0]
    projector = Projector(GradientModel.adapter_shapes(model), K, 11)
    P = projector.dense().astype(np.float64)
    d = P.shape[0]
    gram = P.T @ P
    np.testing.assert_allclose(np.diag(gram), d / K, rtol=1e-6)
    off = gram[~np.eye(K, dtype=bool)]
    assert np.abs(off).max() < 5 * np.sqrt(d) / K
    assert abs((P > 0).mean() - 0.5) < 5 / np.sqrt(P.size)


CHATS = [
    [{"role": "user", "content": "What is FITS?"},
     {"role": "assistant", "content": "An image format."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And HDF5?"},
     {"role": "assistant", "content": "A data container."}],
]  # fmt: skip


def test_chat_features_mask_the_prompt_as_a_loop_on_hf_loss_does(warmed, tiny_lm):
    """Conversations: the gradient is of HF's own `.loss` with labels -100 on every token but
    the assistant's (the reference masks the prompt), example by example; the batched features
    equal it, and differ from the unmasked text's."""
    from raysift.engine.render import plain, render

    model, tok, _, store, _ = warmed
    actor = _actor(tiny_lm, store)
    P = actor.model.projector.dense()
    names = list(actor.model.projector.shapes)
    got = actor.features(CHATS, "targets")[:, 0]
    model.eval()
    for i, messages in enumerate(CHATS):
        ex = render(tok, messages, 24)
        assert lm.IGNORE in ex.labels and set(ex.labels) != {lm.IGNORE}
        loss = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        want = torch.cat([g.reshape(-1) for g in grads]).double().numpy() @ P
        want /= np.linalg.norm(want)
        assert np.linalg.norm(got[i] - want) < 1e-5, i
    unmasked = actor.features([plain(m) for m in CHATS], "targets")[:, 0]
    assert np.abs(unmasked - got).max() > 1e-2  # the prompt's tokens would change the gradient
