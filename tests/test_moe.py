"""The MoE layer (models/moe.py): every routing mode on a hand-worked example, the stacked experts
against the per-expert loop, pools, the capacity predictor, thresholds and the inference rules.

The hand-worked layer: D = E = 3, router weight = identity, so a token's router logits are the token
itself and its gate scores are softmax(x). Six tokens (written as rows, logits for experts 0, 1, 2):

    t0 (3, 0, 0)   scores (0.909, 0.045, 0.045)
    t1 (2, 2, 0)   scores (0.468, 0.468, 0.063)
    t2 (0, 3, 0)   scores (0.045, 0.909, 0.045)
    t3 (0, 0, 0)   scores (1/3, 1/3, 1/3)
    t4 (0, 0, 2)   scores (0.107, 0.107, 0.787)
    t5 (0, 0, 1)   scores (0.212, 0.212, 0.576)

One pool of all six tokens, C = 1: k = floor(6 * 1 / 3) = 2 per expert.
    expert 0 takes t0, t1; expert 1 takes t2, t1; expert 2 takes t4, t5; t3 is chosen by nobody.
With w1 = 0, b1 = 0 every expert FFN outputs its bias b2[e] (GELU(0) = 0), so the combine rule
y[s] = sum_e score[s, e] * FFN_e(x[s]) can be checked by hand with b2[e] = 10^e * unit_e.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from diffmoe_dist.config import ModelConfig, MoEConfig
from diffmoe_dist.models.dit import DiffMoE
from diffmoe_dist.models.moe import LocalDispatcher, MoELayer, StackedExperts, combine

TOKENS = [[3, 0, 0], [2, 2, 0], [0, 3, 0], [0, 0, 0], [0, 0, 2], [0, 0, 1]]


def softmax_row(v: list[float]) -> list[float]:
    ex = [math.exp(a) for a in v]
    return [a / sum(ex) for a in ex]


SCORES = [softmax_row(t) for t in TOKENS]  # [6][3], written out in the module docstring


def hand_layer(mode: str, pool_samples: int = 3, capacity: float = 1.0) -> MoELayer:
    """D = E = 3, router = identity, experts output b2[e] = 10^e * unit_e (see module docstring)."""
    torch.manual_seed(0)
    layer = MoELayer(3, 4, 3, mode=mode, pool_samples=pool_samples, capacity=capacity)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3))
        layer.experts.w1.zero_()
        layer.experts.b1.zero_()
        layer.experts.b2.copy_(torch.diag(torch.tensor([1.0, 10.0, 100.0])))
    return layer


def hand_x(order: list[int] | None = None) -> torch.Tensor:
    rows = [TOKENS[i] for i in (order or range(6))]
    return torch.tensor(rows, dtype=torch.float32).view(3, 2, 3)  # B = 3 samples of T = 2 tokens


def expected_out(mask: list[list[int]]) -> torch.Tensor:
    """y[s] = sum over chosen e of score[s, e] * b2[e], from the hand mask [6][3]."""
    y = torch.zeros(6, 3)
    for s, e in itertools.product(range(6), range(3)):
        if mask[s][e]:
            y[s, e] += SCORES[s][e] * 10.0**e
    return y


def ffn_ref(experts: StackedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(x @ experts.w1[e] + experts.b1[e], approximate="tanh")
    return h @ experts.w2[e] + experts.b2[e]


def random_layer(mode: str = "diffmoe", E: int = 4, D: int = 8, pool_samples: int = 2, **kw):
    torch.manual_seed(1)
    layer = MoELayer(D, 2 * D, E, mode=mode, pool_samples=pool_samples, **kw)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)  # spread the scores so selections are not all ties
        layer.experts.b1.normal_(0, 0.1)
        layer.experts.b2.normal_(0, 0.1)
    return layer


# --------------------------------------------------------------------------------------------------
# routing modes on the hand-worked example

DIFFMOE_MASK = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_diffmoe_hand_example_selection_k_and_combine() -> None:
    layer = hand_layer("diffmoe", pool_samples=3).train()
    y = layer(hand_x())
    st = layer.stats
    assert st.route_mask.int().tolist() == DIFFMOE_MASK
    assert st.expert_counts.tolist() == [2, 2, 2]  # k = floor(6 * 1 / 3) = 2
    assert st.token_pairs.tolist() == [1, 2, 1, 0, 1, 1]
    assert st.pairs == 6 and st.tokens == 6 and st.capacity == 1.0
    torch.testing.assert_close(y.view(6, 3), expected_out(DIFFMOE_MASK))
    # t1 gets score-weighted outputs of two experts, not renormalised: 0.468 * 1 and 0.468 * 10.
    assert y.view(6, 3)[1].tolist() == pytest.approx([SCORES[1][0], 10 * SCORES[1][1], 0.0])
    # t3 was chosen by nobody: exactly zero.
    assert torch.equal(y.view(6, 3)[3], torch.zeros(3))


def test_diffmoe_hand_example_with_real_experts() -> None:
    layer = hand_layer("diffmoe", pool_samples=3).train()
    with torch.no_grad():
        torch.manual_seed(3)
        layer.experts.reset_parameters()
        layer.experts.b1.normal_()
        layer.experts.b2.normal_()
    x = hand_x()
    y = layer(x).view(6, 3)
    xf = x.view(6, 3)
    ref = torch.zeros(6, 3)
    for s, e in itertools.product(range(6), range(3)):
        if DIFFMOE_MASK[s][e]:
            ref[s] += SCORES[s][e] * ffn_ref(layer.experts, e, xf[s])
    torch.testing.assert_close(y, ref.detach())
    assert torch.equal(y[3], torch.zeros(3))


def test_diffmoe_capacity_changes_k() -> None:
    # C = 0.5: k = floor(6 * 0.5 / 3) = 1 -> each expert takes only its best token.
    layer = hand_layer("diffmoe", pool_samples=3, capacity=0.5).train()
    y = layer(hand_x())
    mask = [[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert layer.stats.route_mask.int().tolist() == mask
    assert layer.stats.capacity == 0.5
    torch.testing.assert_close(y.view(6, 3), expected_out(mask))


def test_ec_routes_within_each_image() -> None:
    # EC with T = 6 tokens per image: k = floor(6 * 1 / 3) = 2 per expert per image. Image 0 is the
    # hand pool in order, image 1 the same tokens reversed: each image selects on its own, so image 1's
    # mask is image 0's reversed (a pooled top-4 over both images would not give exactly 2 per image).
    layer = hand_layer("ec").train()
    x0 = torch.tensor(TOKENS, dtype=torch.float32)
    x = torch.stack([x0, x0.flip(0)])  # [B=2, T=6, D=3]
    y = layer(x)
    m = layer.stats.route_mask.view(2, 6, 3).int()
    assert m[0].tolist() == DIFFMOE_MASK
    assert m[1].tolist() == DIFFMOE_MASK[::-1]
    assert m.sum(1).tolist() == [[2, 2, 2], [2, 2, 2]]
    torch.testing.assert_close(y[0], expected_out(DIFFMOE_MASK))
    torch.testing.assert_close(y[1], expected_out(DIFFMOE_MASK).flip(0))


def test_ec_k_per_image_tiny_images() -> None:
    # T = 2 tokens per image, E = 3: k = floor(2 / 3) = 0 -> nothing is processed, output exactly 0.
    layer = hand_layer("ec").train()
    y = layer(hand_x())
    assert layer.stats.pairs == 0
    assert torch.equal(y, torch.zeros_like(y))


TC_MASK = [
    [1, 0, 0],  # t0 -> e0
    [1, 0, 0],  # t1 ties e0 / e1 -> lower expert e0
    [0, 1, 0],  # t2 -> e1
    [1, 0, 0],  # t3 three-way tie -> e0
    [0, 0, 1],  # t4 -> e2
    [0, 0, 1],  # t5 -> e2
]


def test_tc_hand_example_and_balance_loss() -> None:
    layer = hand_layer("tc", pool_samples=3).train()
    y = layer(hand_x())
    assert layer.stats.route_mask.int().tolist() == TC_MASK
    torch.testing.assert_close(y.view(6, 3), expected_out(TC_MASK))
    # Switch loss E * sum_e f_e * P_e, f_e = fraction of tokens sent to e, P_e = mean gate prob.
    f = [3 / 6, 1 / 6, 2 / 6]
    P = [sum(SCORES[s][e] for s in range(6)) / 6 for e in range(3)]
    expected = 3 * sum(fe * pe for fe, pe in zip(f, P))
    assert layer.stats.balance_loss.item() == pytest.approx(expected, rel=1e-5)


def test_tc_balance_loss_averages_pools() -> None:
    # Two pools of 3 samples: the loss is the mean of each pool's E * sum f_e P_e.
    layer = hand_layer("tc", pool_samples=3).train()
    x = torch.cat([hand_x(), hand_x([2, 2, 2, 0, 4, 5])])  # [6, 2, 3]
    layer(x)
    per_pool = []
    for order in (list(range(6)), [2, 2, 2, 0, 4, 5]):
        sc = [SCORES[i] for i in order]
        choice = [max(range(3), key=lambda e, r=r: (r[e], -e)) for r in sc]
        f = [sum(c == e for c in choice) / 6 for e in range(3)]
        P = [sum(r[e] for r in sc) / 6 for e in range(3)]
        per_pool.append(3 * sum(a * b for a, b in zip(f, P)))
    assert layer.stats.balance_loss.item() == pytest.approx(sum(per_pool) / 2, rel=1e-5)


def test_dense_mode_is_plain_ffn() -> None:
    torch.manual_seed(0)
    layer = MoELayer(4, 8, 3, mode="dense")
    x = torch.randn(2, 3, 4)
    ref = F.gelu(x @ layer.ffn.fc1.weight.t() + layer.ffn.fc1.bias, approximate="tanh")
    ref = ref @ layer.ffn.fc2.weight.t() + layer.ffn.fc2.bias
    torch.testing.assert_close(layer(x), ref)
    assert not hasattr(layer, "router")


# --------------------------------------------------------------------------------------------------
# stacked experts vs the loop reference


@pytest.mark.parametrize("counts", [[3, 3, 3, 3], [5, 0, 2, 1], [0, 0, 4, 0], [0, 0, 0, 0]])
def test_stacked_experts_match_loop(counts: list[int]) -> None:
    torch.manual_seed(0)
    ex = StackedExperts(4, 5, 7)
    with torch.no_grad():
        ex.b1.normal_()
        ex.b2.normal_()
    c = torch.tensor(counts)
    x = torch.randn(int(c.sum()), 5, requires_grad=True)
    g = torch.randn(int(c.sum()), 5)

    def run(fn):
        ex.zero_grad()
        if x.grad is not None:
            x.grad = None
        out = fn(x, c)
        (out * g).sum().backward()
        grads = [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ex.parameters()
        ]
        gx = x.grad.clone() if x.grad is not None else torch.zeros_like(x)
        return out.detach(), gx, grads

    out_fast, gx_fast, gp_fast = run(ex)
    out_loop, gx_loop, gp_loop = run(ex.loop_forward)
    assert out_fast.shape == (int(c.sum()), 5)
    torch.testing.assert_close(out_fast, out_loop)
    torch.testing.assert_close(gx_fast, gx_loop)
    for a, b in zip(gp_fast, gp_loop):
        torch.testing.assert_close(a, b)
    # A zero-count expert receives no gradient.
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.all(gp_fast[0][e] == 0)  # w1


@pytest.mark.parametrize("index_dtype", [torch.long, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_combine_matches_autograd_expression(dtype: torch.dtype, index_dtype: torch.dtype) -> None:
    # combine() has a hand-written backward; it must equal autograd of the plain expression, with a
    # token picked by several pairs, a token picked by none, and bf16 expert outputs (autocast);
    # with a long index and with the int32 index the layer passes on CPU (index_add_'s row loop).
    gen = torch.Generator().manual_seed(3)
    tok = torch.tensor([0, 2, 4, 1, 2, 4, 2]).to(index_dtype)  # token 3 unpicked, token 2 thrice
    y = torch.randn(7, 5, generator=gen).to(dtype).requires_grad_()
    w = torch.rand(
        7, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    w.requires_grad_()
    g = torch.randn(6, 5, generator=gen, dtype=w.dtype)
    out_dtype = w.dtype

    def run(fn):
        y.grad = w.grad = None
        out = fn()
        (out * g).sum().backward()
        return out.detach(), y.grad.clone(), w.grad.clone()

    got = run(lambda: combine(y, w, tok, 6, out_dtype))
    ref = run(
        lambda: torch.zeros(6, 5, dtype=out_dtype).index_add_(
            0, tok, (y * w[:, None]).to(out_dtype)
        )
    )
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    assert torch.all(got[0][3] == 0) and torch.all(got[0][5] == 0)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda a, b: combine(a, b, tok, 6, torch.float64), (y, w))


def test_layer_gradients_equal_plain_indexing_reference() -> None:
    # The layer gathers tokens and combine weights with index_select over an int32 index on CPU
    # and combines with its own backward; all of it must equal autograd of the plain expression
    # (long advanced indexing, an accumulating index_put_): output, input, router and expert grads.
    layer = random_layer("diffmoe", E=4, D=8, pool_samples=2)
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(7), requires_grad=True)
    g = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(8))

    def grads(fn):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = fn()
        (out * g).sum().backward()
        names = ("router.weight", "experts.w1", "experts.b1", "experts.w2", "experts.b2")
        params = dict(layer.named_parameters())
        return [out.detach(), x.grad.clone()] + [params[n].grad.clone() for n in names]

    got = grads(lambda: layer(x))
    mask = layer.stats.route_mask  # [N, E] the selection of that forward

    def reference() -> torch.Tensor:
        xf = x.reshape(-1, 8)
        scores = torch.softmax(layer.router(xf), -1)
        exp, tok = mask.t().nonzero().unbind(1)  # grouped by expert, then token (long)
        y = layer.experts.loop_forward(xf[tok], mask.sum(0))
        out = torch.zeros_like(xf).index_put_(
            (tok,), y * scores[tok, exp][:, None], accumulate=True
        )
        return out.view_as(x)

    want = grads(reference)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0


def test_uneven_counts_cost_exact_flops() -> None:
    # Token choice can be badly imbalanced; uneven counts must not run padding rows (a padded
    # [E, max_count, D] batched matmul would count 4 * 9 rows here instead of 12).
    from torch.utils.flop_counter import FlopCounterMode

    ex = StackedExperts(4, 8, 32)
    c = torch.tensor([9, 1, 0, 2])
    x = torch.randn(12, 8, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        ex(x, c).sum().backward()
    assert fc.get_total_flops() == 3 * 12 * 4 * 8 * 32  # fwd + (input, weight) grads, 12 rows


def test_stacked_experts_rows_go_to_their_expert() -> None:
    # Independent of both paths: row i of the input must be processed by the expert it is grouped in.
    torch.manual_seed(0)
    ex = StackedExperts(3, 4, 6)
    c = torch.tensor([2, 0, 3])
    x = torch.randn(5, 4)
    out = ex(x, c)
    owners = [0, 0, 2, 2, 2]
    for i, e in enumerate(owners):
        torch.testing.assert_close(out[i], ffn_ref(ex, e, x[i]).detach())


@pytest.mark.parametrize("mode", ["diffmoe", "ec", "tc"])
def test_layer_with_loop_dispatcher_matches_default(mode: str) -> None:
    layer = random_layer(mode, pool_samples=2)
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(3))

    def run(dispatcher):
        layer.dispatcher = dispatcher
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        loss = (out * g).sum()
        loss.backward()
        return (
            out.detach(),
            x.grad.clone(),
            {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None},
        )

    out_a, gx_a, gp_a = run(LocalDispatcher())
    out_b, gx_b, gp_b = run(LocalDispatcher(use_loop=True))
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(gx_a, gx_b)
    assert gp_a.keys() == gp_b.keys() and "router.weight" in gp_a
    for n in gp_a:
        torch.testing.assert_close(gp_a[n], gp_b[n], msg=n)


def test_layer_matches_slow_reference_random() -> None:
    # Whole diffmoe layer vs an explicit loop: per pool, per expert, sort tokens by (-score, index).
    layer = random_layer("diffmoe", E=4, D=8, pool_samples=2)
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(5))
    y = layer(x).detach()
    xf = x.view(-1, 8)
    scores = torch.softmax(xf @ layer.router.weight.t(), -1)
    S, k = 10, 10 // 4
    ref = torch.zeros_like(xf)
    for p, e in itertools.product(range(2), range(4)):
        idx = sorted(range(p * S, (p + 1) * S), key=lambda s: (-float(scores[s, e].detach()), s))[
            :k
        ]
        for s in idx:
            ref[s] += scores[s, e] * ffn_ref(layer.experts, e, xf[s])
    torch.testing.assert_close(y.view(-1, 8), ref.detach())


# --------------------------------------------------------------------------------------------------
# pools


def test_pools_route_independently() -> None:
    # B = 6 samples, pool_samples = 3: pool 0 = samples 0-2, pool 1 = samples 3-5, each on its own.
    layer = random_layer("diffmoe", E=3, D=8, pool_samples=3)
    x = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(7))
    y = layer(x)
    mask = layer.stats.route_mask.clone()
    y0, m0 = layer(x[:3]), layer.stats.route_mask.clone()
    y1, m1 = layer(x[3:]), layer.stats.route_mask.clone()
    torch.testing.assert_close(y, torch.cat([y0, y1]))
    assert torch.equal(mask, torch.cat([m0, m1]))
    # Each expert takes exactly k = floor(12 / 3) = 4 tokens in each pool.
    assert mask.view(2, 12, 3).sum(1).tolist() == [[4, 4, 4], [4, 4, 4]]


def test_pool_size_changes_the_selection_by_hand() -> None:
    # Pool A = the hand tokens, pool B = six copies of t3 (all scores 1/3).
    # pool_samples = 3: A selects DIFFMOE_MASK; in B every expert takes the two lowest indices (ties).
    # pool_samples = 6 (one pool of 12, k = 4): expert 0 takes t0, t1 of A, then the 1/3 ties: A's t3
    # (index 3) and B's first token (index 6) -> A's t3 is now processed, B's second token is not.
    layer = hand_layer("diffmoe", pool_samples=3).train()
    x = torch.cat([hand_x(), torch.zeros(3, 2, 3)])
    layer(x)
    m = layer.stats.route_mask.int().tolist()
    assert m[:6] == DIFFMOE_MASK
    assert m[6:] == [[1, 1, 1], [1, 1, 1]] + [[0, 0, 0]] * 4
    layer.pool_samples = 6
    layer(x)
    m = layer.stats.route_mask.int()
    assert m[:, 0].tolist() == [1, 1, 0, 1, 0, 0] + [1, 0, 0, 0, 0, 0]
    assert m.sum(0).tolist() == [4, 4, 4]


def test_training_batch_must_tile_pools() -> None:
    layer = random_layer("diffmoe", pool_samples=3).train()
    with pytest.raises(ValueError, match="pool_samples"):
        layer(torch.randn(4, 2, 8))


# --------------------------------------------------------------------------------------------------
# capacity predictor and thresholds


def test_predictor_input_is_detached() -> None:
    layer = random_layer("diffmoe", pool_samples=2).train()
    x = torch.randn(2, 5, 8, requires_grad=True)
    layer(x)
    cp = layer.stats.cp_loss
    assert cp is not None and cp.requires_grad
    cp.backward()
    assert x.grad is None or torch.all(x.grad == 0)
    assert layer.router.weight.grad is None
    assert all(p.grad is None for p in layer.experts.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.predictor.parameters())


def test_predictor_gets_no_gradient_into_the_backbone() -> None:
    model = tiny_model().train()
    x = torch.randn(4, 2, 8, 8)
    model(x, torch.rand(4), torch.tensor([0, 1, 2, 3]))
    model.aux_losses()["cp_loss"].backward()
    got_grad = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert got_grad, "the predictor itself must learn"
    assert all(".predictor." in n for n in got_grad), sorted(got_grad)


def test_predictor_bce_target_is_routing_mask() -> None:
    layer = random_layer("diffmoe", pool_samples=2).train()
    x = torch.randn(2, 5, 8)
    layer(x)
    mask = layer.stats.route_mask.float()
    z = layer.predictor(x.view(-1, 8)).detach()
    # BCE by hand: mean of -[m log sigmoid(z) + (1 - m) log(1 - sigmoid(z))]
    p = torch.sigmoid(z.double())
    ref = -(mask * p.log() + (1 - mask) * (1 - p).log()).mean()
    assert layer.stats.cp_loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # Against an all-zero target the value would differ: the mask matters.
    assert mask.sum() > 0


def test_update_thresholds_ema() -> None:
    layer = hand_layer("diffmoe")
    assert layer.thresholds.tolist() == [0.0, 0.0, 0.0]
    m = torch.tensor([0.4, 0.8, 0.2])
    layer.update_thresholds(m)
    # 0.95 * 0 + 0.05 * m
    assert layer.thresholds.tolist() == pytest.approx([0.02, 0.04, 0.01])
    layer.update_thresholds(m)
    # 0.95 * 0.05 m + 0.05 m = 0.0975 m
    assert layer.thresholds.tolist() == pytest.approx([0.039, 0.078, 0.0195])
    layer.update_thresholds(torch.tensor([0.0, 0.0, 0.0]))
    assert layer.thresholds.tolist() == pytest.approx([0.03705, 0.0741, 0.018525])


def test_thresholds_do_not_move_in_forward() -> None:
    layer = random_layer("diffmoe", pool_samples=2).train()
    layer(torch.randn(2, 5, 8))
    assert torch.equal(layer.thresholds, torch.zeros(4))


def test_kth_sum_matches_slow_reference() -> None:
    layer = random_layer("diffmoe", E=4, D=8, pool_samples=2).train()
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(11))  # 3 pools of S = 10
    layer(x)
    probs = torch.sigmoid(layer.predictor(x.view(-1, 8))).detach()
    k = 10 * 1 // 4  # 2
    ref = torch.zeros(4)
    for p, e in itertools.product(range(3), range(4)):
        vals = sorted(probs[p * 10 : (p + 1) * 10, e].tolist(), reverse=True)
        ref[e] += vals[k - 1]
    assert layer.stats.kth_count == 3
    torch.testing.assert_close(layer.stats.kth_sum, ref)


# --------------------------------------------------------------------------------------------------
# inference rules


def predictor_layer() -> MoELayer:
    """The hand layer with predictor logits = (silu(x0), silu(x0), silu(x2)): fc1 = I, fc2 picks rows.

    Probabilities sigmoid(silu(v)): v = 0 -> 0.5, 1 -> 0.675, 2 -> 0.853, 3 -> 0.946. So
        pred e0 = pred e1: t0 0.946, t1 0.853, t2..t5 0.5
        pred e2:           t0..t3 0.5, t4 0.853, t5 0.675
    """
    layer = hand_layer("diffmoe", pool_samples=3)
    with torch.no_grad():
        layer.predictor.fc1.weight.copy_(torch.eye(3))
        layer.predictor.fc1.bias.zero_()
        layer.predictor.fc2.weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]]))
        layer.predictor.fc2.bias.zero_()
    return layer.eval()


def test_static_inference_capacity() -> None:
    layer = hand_layer("diffmoe", pool_samples=3).eval()
    for C, k in [(1.0, 2), (0.5, 1), (0.7, 1), (1.5, 3)]:
        layer.set_inference("static", capacity=C)
        layer(hand_x())
        assert layer.stats.expert_counts.tolist() == [k, k, k]
        # C_infer = pairs / tokens = E * floor(S * C / E) / S
        assert layer.stats.capacity == pytest.approx(3 * math.floor(6 * C / 3) / 6)
    # Training capacity does not leak into inference.
    layer.set_inference("static", capacity=0.5)
    layer.capacity = 1.0
    layer(hand_x())
    assert layer.stats.pairs == 3


def test_inference_pools_tile_the_batch() -> None:
    # Eval batch of 6 with pool_samples = 3: two pools route on their own, as in training (the
    # second pool is six copies of t3, whose ties go to the lowest indices).
    layer = hand_layer("diffmoe", pool_samples=3).eval()
    layer(torch.cat([hand_x(), torch.zeros(3, 2, 3)]))
    m = layer.stats.route_mask.int().tolist()
    assert m[:6] == DIFFMOE_MASK
    assert m[6:] == [[1, 1, 1], [1, 1, 1]] + [[0, 0, 0]] * 4


def test_dynamic_inference_predictor_counts_router_chooses() -> None:
    layer = predictor_layer()
    layer.set_inference("dynamic")
    layer.thresholds.copy_(torch.tensor([0.6, 0.9, 0.7]))
    y = layer(hand_x())
    # k_0 = #{pred e0 > 0.6} = 2 -> router's top-2 for e0: t0, t1
    # k_1 = #{pred e1 > 0.9} = 1 (t0, by the predictor) -> router's top-1 for e1: t2 (not t0)
    # k_2 = #{pred e2 > 0.7} = 1 -> router's top-1 for e2: t4
    mask = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert layer.stats.route_mask.int().tolist() == mask
    assert layer.stats.expert_counts.tolist() == [2, 1, 1]
    assert layer.stats.capacity == pytest.approx(4 / 6)
    torch.testing.assert_close(y.view(6, 3), expected_out(mask))


def test_gamma_inference_one_global_threshold() -> None:
    layer = predictor_layer()
    layer.thresholds.fill_(0.99)  # ignored by the gamma rule
    layer.set_inference("gamma", gamma=0.6)
    layer(hand_x())
    # every expert counts 2 tokens above 0.6 -> router's top-2 = the training selection
    assert layer.stats.route_mask.int().tolist() == DIFFMOE_MASK
    layer.set_inference("gamma", gamma=0.9)
    layer(hand_x())
    # counts: e0 1, e1 1, e2 0 -> e0: t0, e1: t2
    assert layer.stats.expert_counts.tolist() == [1, 1, 0]
    assert layer.stats.route_mask.int().tolist() == [
        [1, 0, 0],
        [0, 0, 0],
        [0, 1, 0],
        [0, 0, 0],
        [0, 0, 0],
        [0, 0, 0],
    ]


def test_independent_inference_hand_example() -> None:
    layer = predictor_layer()
    layer.set_inference("independent")
    layer.thresholds.copy_(torch.tensor([0.6, 0.9, 0.5]))
    y = layer(hand_x())
    # token -> e iff its own predictor probability > threshold_e (strictly):
    # e0: t0 (0.946), t1 (0.853); e1: t0 (0.946); e2: t4 (0.853), t5 (0.675), not the exact 0.5s
    mask = [[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert layer.stats.route_mask.int().tolist() == mask
    torch.testing.assert_close(y.view(6, 3), expected_out(mask))


def test_independent_inference_does_not_depend_on_batch_mates() -> None:
    layer = random_layer("diffmoe", E=4, D=8, pool_samples=2).eval()
    layer.set_inference("independent")
    layer.thresholds.copy_(torch.tensor([0.45, 0.5, 0.55, 0.5]))
    g = torch.Generator().manual_seed(13)
    x = torch.randn(5, 6, 8, generator=g)
    y_batch = layer(x)
    assert 0 < layer.stats.pairs < 5 * 6 * 4  # a real selection, not all or nothing
    for i in range(5):
        torch.testing.assert_close(layer(x[i : i + 1])[0], y_batch[i])
        other = torch.randn(3, 6, 8, generator=g)
        torch.testing.assert_close(layer(torch.cat([other, x[i : i + 1]]))[-1], y_batch[i])


def test_inference_rules_need_predictor() -> None:
    layer = hand_layer("ec")
    with pytest.raises(ValueError, match="predictor"):
        layer.set_inference("dynamic")
    with pytest.raises(ValueError):
        hand_layer("diffmoe").set_inference("nope")


# --------------------------------------------------------------------------------------------------
# C_infer on a model


def tiny_model(**moe_kw) -> DiffMoE:
    torch.manual_seed(0)
    m = ModelConfig(input_size=8, in_channels=2, patch_size=2, depth=4, hidden_size=16, num_heads=2)
    m.num_classes = 4
    moe = MoEConfig(mode="diffmoe", num_experts=4, pool_samples=2, **moe_kw)
    return DiffMoE(m, moe)


def test_model_c_infer_static() -> None:
    # T = 16 tokens, eval batch of 2 = one pool of S = 32; C = 0.3 -> k = floor(32 * 0.3 / 4) = 2,
    # so C_infer = 4 * 2 / 32 = 0.25 in each of the 2 MoE layers.
    model = tiny_model(infer_capacity=0.3).eval()
    with torch.no_grad():
        model(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 4]))
    per, mean = model.c_infer()
    assert per == pytest.approx([0.25, 0.25])
    assert mean == pytest.approx(0.25)


def test_model_c_infer_dynamic_is_mean_over_layers() -> None:
    model = tiny_model().eval()
    model.set_inference("dynamic")
    layers = list(model.moe_layers())
    layers[0].thresholds.fill_(0.0)  # every probability > 0 -> k_e = S: every pair processed
    layers[1].thresholds.fill_(1.0)  # nothing passes -> nothing processed
    with torch.no_grad():
        model(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    per, mean = model.c_infer()
    assert per == pytest.approx([4.0, 0.0])  # pairs per token: all 4 experts, then none
    assert mean == pytest.approx(2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_equals_loop_reference(dtype) -> None:
    """Uneven counts (zeros included) through torch._grouped_mm == the per-expert loop reference:
    outputs, input gradients and every weight gradient. fp32: 1e-5; bf16: both paths round the
    same products to bf16, compared at bf16's resolution (2e-2 relative)."""
    from diffmoe_dist.models.moe import StackedExperts, grouped_mm_available

    torch.manual_seed(0)
    ex = StackedExperts(4, 16, 32)
    with torch.no_grad():
        ex.b1.normal_()
        ex.b2.normal_()
    counts = torch.tensor([5, 0, 9, 3])
    x = torch.randn(int(counts.sum()), 16).to(dtype)
    g = torch.randn(x.shape[0], 16).to(dtype)
    assert grouped_mm_available(x)
    outs = {}
    for grouped in (True, False):
        ex.zero_grad()
        ex.use_grouped_mm = grouped
        xi = x.clone().requires_grad_()
        y = ex(xi, counts) if grouped else ex.loop_forward(xi.float(), counts).to(dtype)
        (y.float() * g.float()).sum().backward()
        outs[grouped] = [y.float(), xi.grad.float()] + [p.grad.clone() for p in ex.parameters()]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, **tol)
    assert outs[True][2][1].abs().sum() == 0  # expert 1 got no rows: its w1 gradient is zero
