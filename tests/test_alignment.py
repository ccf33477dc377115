"""BGTAI alignment: DTW against dtw-python, monotonic decoding against brute force, selection, losses, metrics, the
input-free baselines (diagonal guess, per-position prior), BGTAI's straight-through DS-Net selection, and a tiny DS-Net
that learns DTW targets on a toy stretch problem."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avcache.pipeline.dtw import IGNORE, dtw_alignment, dtw_path, path_to_alignment
from avcache.train.models.alignment import (DSNet, DSNetConfig, PositionPrior, ResultFilter, alignment_accuracy,
                                            alignment_ce, diagonal_alignment, dtw_targets, interpolate, mean_index_error,
                                            monotonic_decode, select, selection_matrix, soft_alignment, sp_loss)
from avcache.train.models.bgtai import Bgtai, BgtaiConfig

dtw_lib = pytest.importorskip("dtw", reason="dtw-python is the DTW reference (pip install -e '.[test]')")

SHAPES = [(1, 1), (1, 7), (7, 1), (2, 2), (5, 5), (4, 9), (9, 4), (13, 30), (30, 13)]


@pytest.fixture(autouse=True, scope="module")
def one_thread(torch_one_thread):
    yield


def lib_path(cost: np.ndarray) -> list[tuple[int, int]]:
    out = dtw_lib.dtw(cost, step_pattern="symmetric1")  # steps (1,1), (0,1), (1,0), unit weights: classic DTW
    return list(zip(out.index1.tolist(), out.index2.tolist()))


# ----------------------------------------------------------------------------------------------------------------
# DTW


@pytest.mark.parametrize("shape", SHAPES)
def test_dtw_path_matches_dtw_python(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.random(shape)
        path = dtw_path(cost)
        assert path == lib_path(cost)
        assert path[0] == (0, 0) and path[-1] == (shape[0] - 1, shape[1] - 1)
        steps = {(q1 - q0, t1 - t0) for (q0, t0), (q1, t1) in zip(path, path[1:])}
        assert steps <= {(1, 0), (0, 1), (1, 1)}
        total = sum(cost[q, t] for q, t in path)
        assert total == pytest.approx(dtw_lib.dtw(cost, step_pattern="symmetric1").distance)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "sqeuclidean"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dtw_alignment_matches_dtw_python_on_sequences(shape, metric):
    Q, T = shape
    rng = np.random.default_rng(Q * 100 + T)
    source, target = rng.normal(size=(T, 6)), rng.normal(size=(Q, 6))
    ref = dtw_lib.dtw(target, source, dist_method=metric, step_pattern="symmetric1")  # scipy cdist distances
    expected = path_to_alignment(list(zip(ref.index1.tolist(), ref.index2.tolist())), Q)
    a = dtw_alignment(source, target, metric)
    assert a.shape == (Q,) and a.dtype == np.int64
    np.testing.assert_array_equal(a, expected)
    assert (np.diff(a) >= 0).all() and a.min() >= 0 and a.max() < T


def test_path_to_alignment_takes_middle_rounded_down():
    path = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4), (2, 5), (2, 6), (2, 7)]  # q=0 visits 0..3, q=2 visits 5..7
    np.testing.assert_array_equal(path_to_alignment(path, 3), [1, 4, 6])
    with pytest.raises(ValueError):
        path_to_alignment([(0, 0), (2, 1)], 3)


def test_identical_sequences_give_the_diagonal():
    x = np.random.default_rng(0).normal(size=(11, 5))
    assert dtw_path(np.abs(x[:, None] - x[None]).sum(-1)) == [(i, i) for i in range(11)]
    for metric in ("cosine", "euclidean"):
        np.testing.assert_array_equal(dtw_alignment(x, x, metric), np.arange(11))


def test_time_stretched_copy_gives_the_stretch():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(9, 4))
    counts = rng.integers(1, 4, size=9)
    source = np.repeat(target, counts, axis=0)  # every target frame held for 1..3 source frames
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    stretch = [(q, t) for q in range(9) for t in range(starts[q], starts[q] + counts[q])]
    cost = 1.0 - (target / np.linalg.norm(target, axis=1, keepdims=True)) @ \
        (source / np.linalg.norm(source, axis=1, keepdims=True)).T
    assert dtw_path(cost) == stretch
    np.testing.assert_array_equal(dtw_alignment(source, target), starts + (counts - 1) // 2)
    # The other way round: a stretched target maps every copy of a frame to that frame.
    np.testing.assert_array_equal(dtw_alignment(target, source), np.repeat(np.arange(9), counts))


def test_dtw_rejects_bad_input():
    with pytest.raises(ValueError):
        dtw_path(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        dtw_path(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError):
        dtw_alignment(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError):
        dtw_alignment(np.ones((3, 2)), np.ones((3, 2)), metric="manhattan")


def test_dtw_targets_pads_with_ignore():
    rng = np.random.default_rng(2)
    srcs = [rng.normal(size=(6, 3)), rng.normal(size=(4, 3))]
    tgts = [rng.normal(size=(2, 3)), rng.normal(size=(5, 3))]
    out = dtw_targets(srcs, tgts)
    assert out.shape == (2, 5) and out.dtype == torch.long
    assert (out[0, 2:] == IGNORE).all()
    np.testing.assert_array_equal(out[0, :2].numpy(), dtw_alignment(srcs[0], tgts[0]))
    np.testing.assert_array_equal(out[1].numpy(), dtw_alignment(srcs[1], tgts[1]))


def test_interpolate():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 3))
    for length in (1, 2, 5, 7, 20):
        y = interpolate(x, length)
        assert y.shape == (length, 3)
        grid = np.linspace(0, 6, length)
        ref = np.stack([np.interp(grid, np.arange(7), x[:, d]) for d in range(3)], axis=1)
        np.testing.assert_allclose(y, ref, atol=1e-12)
        xt = torch.tensor(x, dtype=torch.float32)
        ref_t = F.interpolate(xt.T[None], size=length, mode="linear", align_corners=True)[0].T
        torch.testing.assert_close(interpolate(xt, length), ref_t)
    np.testing.assert_allclose(interpolate(x, 7), x)
    np.testing.assert_allclose(interpolate(x[:1], 4), np.repeat(x[:1], 4, axis=0))
    assert interpolate(x.astype(np.float32), 9).dtype == np.float32
    xt = torch.tensor(x, requires_grad=True)
    interpolate(xt, 13).sum().backward()
    assert torch.isfinite(xt.grad).all() and xt.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        interpolate(x, 0)


# ----------------------------------------------------------------------------------------------------------------
# monotonic decoding and selection


def random_masks(gen: torch.Generator, B: int, Q: int, T: int, holes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) source mask with >= 1 valid step, (B, Q) target mask (possibly empty); prefix masks or random holes."""
    if holes:
        src = torch.rand(B, T, generator=gen) < 0.7
        src[torch.arange(B), torch.randint(T, (B,), generator=gen)] = True
        tgt = torch.rand(B, Q, generator=gen) < 0.7
    else:
        src = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=gen)
        tgt = torch.arange(Q)[None] < torch.randint(0, Q + 1, (B, 1), generator=gen)
    return src, tgt


def holes_case(case: int) -> bool:
    return case % 2 == 1  # odd cases draw masks with holes, even ones prefix (length) masks


def path_score(scores: torch.Tensor, path: tuple[int, ...], rows: list[int]) -> float:
    return float(sum(scores[q, t] for q, t in zip(rows, path)))


def test_decode_is_monotonic_and_within_valid_source():
    gen = torch.Generator().manual_seed(0)
    for case in range(200):
        B, Q, T = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 5), (1, 12), (1, 15)))
        src_mask, tgt_mask = random_masks(gen, B, Q, T, holes=holes_case(case))
        scores = torch.randn(B, Q, T, generator=gen) * 3
        a = monotonic_decode(scores, src_mask, tgt_mask)
        assert a.shape == (B, Q) and a.dtype == torch.long
        assert (a[~tgt_mask] == IGNORE).all()
        for b in range(B):
            valid = a[b][tgt_mask[b]]
            assert ((valid >= 0) & (valid < T)).all()
            assert src_mask[b][valid].all(), "aligned to a padded source step"
            assert (valid[1:] >= valid[:-1]).all(), f"not monotonic: {valid.tolist()}"
            if not holes_case(case):
                assert (valid < src_mask[b].sum()).all()  # within the valid source length


def test_decode_equals_brute_force_on_tiny_sizes():
    gen = torch.Generator().manual_seed(1)
    for case in range(150):
        B, Q, T = 2, int(torch.randint(1, 4, (), generator=gen)), int(torch.randint(1, 6, (), generator=gen))
        src_mask, tgt_mask = random_masks(gen, B, Q, T, holes=holes_case(case))
        scores = torch.randn(B, Q, T, generator=gen, dtype=torch.float64)
        # DSNet-style scores (-inf at padded pairs) must decode the same as raw scores plus masks.
        padded = scores.masked_fill(~(tgt_mask[:, :, None] & src_mask[:, None, :]), float("-inf"))
        a = monotonic_decode(scores, src_mask, tgt_mask)
        torch.testing.assert_close(DSNet.decode(padded, src_mask, tgt_mask), a)
        for b in range(B):
            rows = torch.nonzero(tgt_mask[b])[:, 0].tolist()
            cols = torch.nonzero(src_mask[b])[:, 0].tolist()
            best = max(itertools.combinations_with_replacement(cols, len(rows)),  # all non-decreasing paths
                       key=lambda p: path_score(scores[b], p, rows))
            assert a[b, rows].tolist() == list(best)


def test_decode_differs_from_argmax_when_argmax_goes_back():
    scores = torch.tensor([[[0.0, 0.0, 5.0, 0.0],
                            [3.0, 0.0, 0.0, 2.9],
                            [0.0, 0.0, 0.0, 4.0]]])
    assert scores.argmax(-1).tolist() == [[2, 0, 3]]  # not monotonic
    assert monotonic_decode(scores).tolist() == [[2, 3, 3]]  # 5 + 2.9 + 4 beats 3 + 3 + 4 and 5 + 0 + 4


def test_decode_rejects_empty_source():
    with pytest.raises(ValueError):
        monotonic_decode(torch.randn(1, 2, 3), torch.zeros(1, 3, dtype=torch.bool))
    # ... unless the item has no valid target step either
    no_src, no_tgt = torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool)
    out = monotonic_decode(torch.randn(1, 2, 3), no_src, no_tgt)
    assert out.tolist() == [[IGNORE, IGNORE]]


def test_selection_matrix_and_select():
    a = torch.tensor([[0, 2, 2, 3], [1, 1, IGNORE, IGNORE]])
    A = selection_matrix(a, 5)
    assert A.shape == (2, 4, 5) and A.dtype == torch.float32
    assert set(A.unique().tolist()) <= {0.0, 1.0}
    assert A.sum(-1).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # one 1 per valid target row
    assert A[0, 1, 2] == 1 and A[1, 0, 1] == 1
    Y = torch.randn(2, 5, 3)
    Y_hat = select(Y, A)
    assert Y_hat.shape == (2, 4, 3)
    torch.testing.assert_close(Y_hat[0], Y[0, [0, 2, 2, 3]])
    torch.testing.assert_close(Y_hat[1, :2], Y[1, [1, 1]])
    assert (Y_hat[1, 2:] == 0).all()
    torch.testing.assert_close(DSNet.select(Y, DSNet.selection_matrix(a, 5)), Y_hat)
    with pytest.raises(ValueError):
        selection_matrix(a, 3)


# ----------------------------------------------------------------------------------------------------------------
# DS-Net


def small_cfg(**kw) -> DSNetConfig:
    base = dict(src_dim=6, tgt_dim=5, width=16, layers=1, heads=2, ffn=32, dropout=0.0)
    return DSNetConfig(**{**base, **kw})


@pytest.mark.parametrize("cls", [DSNet, ResultFilter])
@pytest.mark.parametrize("layers", [0, 1])
def test_dsnet_scores_masks_and_padding_invariance(cls, layers):
    torch.manual_seed(0)
    net = cls(small_cfg(layers=layers)).eval()
    with torch.no_grad():
        net.prior.fill_(0.7)  # exercise the diagonal prior too
    src, tgt = torch.randn(2, 9, 6), torch.randn(2, 4, 5)
    src_mask = torch.arange(9)[None] < torch.tensor([[9], [6]])
    tgt_mask = torch.arange(4)[None] < torch.tensor([[3], [4]])
    scores = net(src, tgt, src_mask, tgt_mask)
    assert scores.shape == (2, 4, 9)
    valid = tgt_mask[:, :, None] & src_mask[:, None, :]
    assert torch.isneginf(scores[~valid]).all() and torch.isfinite(scores[valid]).all()
    # The second item alone, unpadded, scores the same as inside the padded batch.
    alone = net(src[1:, :6], tgt[1:], None, None)
    torch.testing.assert_close(alone[0], scores[1, :, :6], atol=1e-5, rtol=1e-5)
    a = net.align(src, tgt, src_mask, tgt_mask)
    assert a[0, 3] == IGNORE and (a[1] < 6).all() and (a[:, 1:][tgt_mask[:, 1:]] >= a[:, :-1][tgt_mask[:, 1:]]).all()


def test_config_validation():
    with pytest.raises(ValueError):
        small_cfg(width=15)
    with pytest.raises(ValueError):
        small_cfg(layers=-1)
    with pytest.raises(ValueError):
        small_cfg(src_dim=0)


# ----------------------------------------------------------------------------------------------------------------
# losses and metrics


def test_alignment_ce():
    gen = torch.Generator().manual_seed(4)
    B, Q, T = 3, 5, 7
    target = torch.randint(0, T, (B, Q), generator=gen)
    tgt_mask = torch.arange(Q)[None] < torch.tensor([[5], [3], [1]])
    perfect = torch.zeros(B, Q, T).scatter(-1, target[..., None], 1e4)
    assert alignment_ce(perfect, target, tgt_mask) < 1e-6
    margin = 20.0  # the documented bound log(1 + (T-1) e^-m)
    assert alignment_ce(perfect / 1e4 * margin, target, tgt_mask) <= np.log1p((T - 1) * np.exp(-margin)) + 1e-12
    scores = torch.randn(B, Q, T, generator=gen, requires_grad=True)
    loss = alignment_ce(scores, target, tgt_mask)
    assert loss > 0
    ref = F.cross_entropy(scores[tgt_mask], target[tgt_mask])
    torch.testing.assert_close(loss, ref)
    wrong = torch.zeros(B, Q, T).scatter(-1, ((target + 1) % T)[..., None], 1e4)
    assert alignment_ce(wrong, target, tgt_mask) > 1e3
    # Padded rows at -inf (as DSNet emits them) and IGNORE targets are fine, and gradients stay finite.
    padded = scores.masked_fill(~tgt_mask[..., None], float("-inf"))
    loss2 = alignment_ce(padded, target.masked_fill(~tgt_mask, IGNORE), tgt_mask)
    torch.testing.assert_close(loss2, ref)
    loss2.backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[~tgt_mask] == 0).all()


def test_soft_alignment_and_gradients():
    target = torch.tensor([[0, 3, 3, 5], [1, 2, IGNORE, IGNORE]])
    src_mask = torch.arange(6)[None] < torch.tensor([[6], [3]])
    sharp = torch.zeros(2, 4, 6).scatter(-1, target.clamp(min=0)[..., None], 1e4)
    soft = soft_alignment(sharp, src_mask)
    torch.testing.assert_close(soft[0], target[0].float())
    # Flat scores: the expectation runs over valid source steps only (mean of 0, 1, 2 for item 1).
    flat = soft_alignment(torch.zeros(2, 4, 6), src_mask)
    torch.testing.assert_close(flat, torch.tensor([[2.5] * 4, [1.0] * 4]))
    assert soft_alignment(torch.full((1, 2, 3), float("-inf"))).tolist() == [[0.0, 0.0]]

    torch.manual_seed(0)
    net = DSNet(small_cfg())
    src, tgt = torch.randn(2, 6, 6), torch.randn(2, 4, 5)
    tgt_mask = target >= 0
    scores = net(src, tgt, src_mask, tgt_mask)
    loss = sp_loss(soft_alignment(scores, src_mask), target, src_mask.sum(-1), tgt_mask)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert net.query.weight.grad.abs().sum() > 0 and net.src_encoder.proj.weight.grad.abs().sum() > 0


def test_sp_loss():
    target = torch.tensor([[0, 2, 4, 4], [0, 1, 1, IGNORE], [0, 0, 0, 0]])
    tgt_mask = target >= 0
    src_lengths = torch.tensor([5, 3, 1])
    assert sp_loss(target, target, src_lengths, tgt_mask) == 0.0  # exactly
    assert sp_loss(target.float(), target, src_lengths, tgt_mask) == 0.0
    # A length-1 source normalises everything to 0, whatever the prediction.
    assert sp_loss(torch.tensor([[3, 3]]), torch.tensor([[0, 0]]), torch.tensor([1])) == 0.0
    pred = target.clone()
    pred[0, 1] = 3  # off by 1 / (5 - 1)
    pred[1, 0] = 2  # off by 2 / (3 - 1)
    pred[1, 3] = 2  # padded: ignored
    expected = (0.25 + 1.0) / 11  # 11 valid target steps
    torch.testing.assert_close(sp_loss(pred, target, src_lengths, tgt_mask), torch.tensor(expected))
    assert sp_loss(pred, target, src_lengths, tgt_mask) > 0
    assert mean_index_error(pred, target, tgt_mask, normalised=True, src_lengths=src_lengths) == \
        pytest.approx(expected)


def test_metrics():
    target = torch.tensor([[0, 2, 4, 4], [0, 1, 1, IGNORE]])
    tgt_mask = target >= 0
    pred = torch.tensor([[0, 3, 4, 2], [0, 1, 1, 0]])
    assert alignment_accuracy(pred, target, tgt_mask) == pytest.approx(5 / 7)
    assert alignment_accuracy(pred, target, tgt_mask, tolerance=1) == pytest.approx(6 / 7)
    assert alignment_accuracy(pred, target, tgt_mask, tolerance=2) == 1.0
    assert mean_index_error(pred, target, tgt_mask) == pytest.approx(3 / 7)
    assert mean_index_error(target, target, tgt_mask) == 0.0
    assert np.isnan(alignment_accuracy(pred, target, torch.zeros_like(tgt_mask)))
    with pytest.raises(ValueError):
        mean_index_error(pred, target, tgt_mask, normalised=True)


# ----------------------------------------------------------------------------------------------------------------
# input-free baselines


def test_the_diagonal_guess_runs_corner_to_corner_on_lengths_alone():
    mask = torch.tensor([[True] * 8, [True] * 6 + [False] * 2, [True] + [False] * 7])
    guess = diagonal_alignment(mask, torch.tensor([5, 6, 3]))
    assert guess.tolist() == [[0, 1, 1, 2, 2, 3, 3, 4],           # q * 4/7 rounded
                              [0, 1, 2, 3, 4, 5, IGNORE, IGNORE],  # Q = L: the identity
                              [0] + [IGNORE] * 7]                  # one frame: the first gloss
    assert diagonal_alignment(mask[:1], torch.tensor([1])).tolist() == [[0] * 8]


def test_the_position_prior_predicts_the_most_frequent_relative_target_per_position():
    train = [torch.tensor([0, 0, 1, 2])] * 2 + [torch.tensor([0, 1, 1, 2]), torch.tensor([0, IGNORE, 1, 2])]
    prior = PositionPrior.fit(train, [3, 3, 3, 3], bins=4)
    assert prior.modes.tolist() == [0.0, 0.0, 0.5, 1.0]  # position 1: 0 twice, 1/2 once (IGNORE never counts)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    assert prior.predict(mask, torch.tensor([3, 5, 3])).tolist() == [[0, 0, 1, 2], [0, 0, 2, 4],
                                                                     [0, 1, 2, IGNORE]]  # 3 frames: bins 0, 2, 3
    # a position bin no training frame fell into predicts the diagonal
    ends = PositionPrior.fit([torch.tensor([0, 4])], [5], bins=5)
    assert ends.modes.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert ends.predict(torch.ones(1, 5, dtype=torch.bool), torch.tensor([5])).tolist() == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="bins"):
        PositionPrior.fit(train, [3] * 4, bins=1)


def test_bgtai_selects_the_hard_path_in_training_too_and_ds_net_still_gets_gradients():
    """Training and evaluation feed the Result Filter the same Y_hat (the hard monotonic path); DS-Net learns
    through the softmax's gradient (straight-through)."""
    torch.manual_seed(0)
    model = Bgtai(BgtaiConfig(gloss_vocab=12, clip_dim=8, source="text", text_vocab=20, width=16, align_width=8,
                              dropout=0.0))
    o = torch.randn(2, 7, 16, requires_grad=True)                                     # (B, N, W)
    src_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    tokens = torch.tensor([[4, 5, 6], [7, 8, 0]])                                     # (B, G), 0 = PAD
    gloss_mask = tokens != 0
    y_hat, scores = model.train().selected(o, src_mask, tokens, gloss_mask)
    hard = selection_matrix(monotonic_decode(scores, src_mask, gloss_mask), 7)
    torch.testing.assert_close(y_hat, select(o, hard), rtol=0, atol=1e-6)
    y_hat.square().sum().backward()
    assert model.ds_net.query.weight.grad is not None and model.ds_net.query.weight.grad.abs().sum() > 0
    with torch.no_grad():
        evaluated, _ = model.eval().selected(o, src_mask, tokens, gloss_mask)
    torch.testing.assert_close(evaluated, y_hat.detach())


# ----------------------------------------------------------------------------------------------------------------
# training on a toy problem


def toy_batch(rng: np.random.Generator, B: int, D: int = 8):
    """Targets of 5..10 random frames; each source is its target with every frame held 1..3 steps, plus noise."""
    srcs, tgts = [], []
    for _ in range(B):
        tgt = rng.normal(size=(int(rng.integers(5, 11)), D))
        counts = rng.integers(1, 4, size=len(tgt))
        srcs.append(np.repeat(tgt, counts, axis=0) + 0.3 * rng.normal(size=(int(counts.sum()), D)))
        tgts.append(tgt)
    A = dtw_targets(srcs, tgts)  # (B, Q) supervision
    src = torch.zeros(B, max(map(len, srcs)), D)
    tgt = torch.zeros(B, A.shape[1], D)
    for i, (s, t) in enumerate(zip(srcs, tgts)):
        src[i, :len(s)], tgt[i, :len(t)] = torch.from_numpy(s), torch.from_numpy(t)
    src_mask = torch.arange(src.shape[1])[None] < torch.tensor([len(s) for s in srcs])[:, None]
    return src, tgt, src_mask, A >= 0, A


def test_tiny_dsnet_learns_dtw_targets():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = DSNet(DSNetConfig(src_dim=8, tgt_dim=8, width=32, layers=1, heads=2, ffn=64, dropout=0.0))
    src, tgt, src_mask, tgt_mask, A = toy_batch(rng, 64)  # held out
    before = alignment_accuracy(net.eval().align(src, tgt, src_mask, tgt_mask), A, tgt_mask)
    train = [toy_batch(rng, 16) for _ in range(10)]
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.train()
    for step in range(100):
        s, t, sm, tm, a = train[step % len(train)]
        scores = net(s, t, sm, tm)
        loss = alignment_ce(scores, a, tm) + sp_loss(soft_alignment(scores, sm), a, sm.sum(-1), tm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pred = net.eval().align(src, tgt, src_mask, tgt_mask)
    after = alignment_accuracy(pred, A, tgt_mask)
    assert after > before + 0.3, (before, after)
    assert mean_index_error(pred, A, tgt_mask) < 1.0
