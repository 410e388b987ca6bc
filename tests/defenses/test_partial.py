"""PartialSharing: by-name and by-fraction sharing, the client's local memory, aggregation, state, Compose."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from helpers import ctx_for
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.defenses.base import Compose, Defense, RoundContext
from privfl.defenses.dp import ClipUpdate, GaussianMechanism
from privfl.defenses.partial import PartialSharing, random_mask, shared_count, topk_mask
from privfl.defenses.rng import SeededNoise
from privfl.updates import InvalidUpdateError, apply, clone, flatten, global_l2_norm, weighted_mean

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure")

ENCODERS = ["global_branch.*", "local_branch.*"]
SHAPES = {
    "global_branch.patch_embed.proj.weight": (4, 3),
    "global_branch.layers.0.norm.bias": (4,),
    "local_branch.stem.0.weight": (2, 3),
    "fuse1.conv.weight": (3, 3),
    "fuse1.bn.running_mean": (3,),
    "head.weight": (2, 2),
}
SHARED = [k for k in SHAPES if k.startswith(("global_branch.", "local_branch."))]
LOCAL = [k for k in SHAPES if k not in SHARED]


def state(fill: float | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.full(s, fill) if fill is not None else torch.randn(s, generator=g) for k, s in SHAPES.items()
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def round_trip(defense: PartialSharing, glob, delta, ctx: RoundContext, cid: int):
    """One client's part of a round: personalize, "train" (the given delta), protect."""
    start = defense.personalize(glob, ctx.for_client(cid))
    return start, defense.protect(delta, ctx.for_client(cid))


# ------------------------------------------------------------------ pattern mode


def test_pattern_mode_shares_exactly_the_matched_keys_and_the_aggregate_covers_only_them():
    ps = PartialSharing(share=ENCODERS)
    glob = state(0.0)
    ctx = ctx_for(2, weights=[0.25, 0.75])
    deltas = [state(seed=1), state(seed=2)]
    before = [clone(d) for d in deltas]
    payloads = [round_trip(ps, glob, d, ctx, c)[1] for c, d in enumerate(deltas)]
    for p, d, b in zip(payloads, deltas, before):
        assert list(p) == SHARED
        assert all(torch.equal(p[k], d[k]) for k in SHARED)
        assert same(d, b)  # protect does not mutate its input
    mean = ps.aggregate(payloads, ctx)
    assert list(mean) == SHARED
    assert same(mean, weighted_mean([{k: d[k] for k in SHARED} for d in deltas], [0.25, 0.75]))
    new = apply(glob, mean, allow_missing=True)
    assert all(torch.equal(new[k], glob[k]) for k in LOCAL)  # decoder etc. unchanged globally


def test_pattern_mode_on_dhunet_tiny_names_keeps_the_decoder_local():
    from privfl.fl.client import trainable_state
    from privfl.models import build_model

    glob = trainable_state(build_model("dhunet-tiny"))
    ps = PartialSharing(share=ENCODERS)
    shared = ps.shared_keys(glob)
    assert shared and all(k.split(".")[0] in ("global_branch", "local_branch") for k in shared)
    local = [k for k in glob if k not in shared]
    assert any(k.startswith("fuse") for k in local) and any(k.startswith("head") for k in local)
    delta = {k: torch.full_like(v, 0.5) for k, v in glob.items()}
    _, payload = round_trip(ps, glob, delta, ctx_for(1), 0)
    assert set(payload) == set(shared)
    assert set(ps.kept(0)) == set(local)


@given(st.sets(st.sampled_from(sorted(SHAPES)), min_size=1))
@settings(max_examples=40, deadline=None)
def test_exact_key_patterns_share_exactly_those_keys(keys):
    ps = PartialSharing(share=sorted(keys))
    _, payload = round_trip(ps, state(0.0), state(seed=3), ctx_for(1), 0)
    assert set(payload) == keys
    assert set(ps.kept(0)) == set(SHAPES) - keys


# ------------------------------------------------------------------ fraction mode: selection


@pytest.mark.parametrize(
    "theta, d, k",
    [(0.1, 30, 3), (0.3, 10, 3), (0.25, 10, 3), (1e-9, 10, 1), (1.0, 7, 7), (0.5, 1, 1), (0.7, 10, 7)],
)
def test_shared_count_is_the_ceiling_of_theta_d(theta, d, k):
    assert shared_count(theta, d) == k


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.floats(0.01, 1.0))
@settings(max_examples=200, deadline=None)
def test_topk_mask_picks_the_largest_magnitudes_ties_by_lowest_index(values, theta):
    # small integers: many ties, so the documented tie rule is exercised
    v = torch.tensor(values, dtype=torch.float32)
    k = shared_count(theta, v.numel())
    mask = topk_mask(v, k)
    assert int(mask.sum()) == k
    expected = torch.zeros_like(mask)
    expected[torch.sort(v.abs(), descending=True, stable=True).indices[:k]] = True
    assert torch.equal(mask, expected)
    if k < v.numel():
        assert v.abs()[mask].min() >= v.abs()[~mask].max()


@given(st.floats(0.01, 1.0), st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_fraction_topk_shares_exactly_k_coordinates_with_the_largest_delta(theta, seed):
    ps = PartialSharing(fraction=theta)
    delta = state(seed=seed % 1000)
    _, payload = round_trip(ps, state(0.0), delta, ctx_for(1), 0)
    vec, _ = flatten(delta)
    sent, _ = flatten(payload)
    k = shared_count(theta, vec.numel())
    mask = sent != 0
    assert int(mask.sum()) == k  # randn deltas have no zeros (with probability 1)
    assert torch.equal(sent[mask], vec[mask])
    assert torch.equal(mask, topk_mask(vec, k))
    assert list(payload) == list(delta)  # every key, unshared coordinates zero


def test_random_selection_is_reproducible_per_seed_and_differs_per_round_client_and_seed():
    def sent(seed: int | None, rnd: int, cid: int, ctx_seed: int = 0) -> torch.Tensor:
        ps = PartialSharing(fraction=0.3, select="random", seed=seed)
        ctx = ctx_for(3, rnd=rnd, seed=ctx_seed)
        _, payload = round_trip(ps, state(0.0), state(seed=9), ctx, cid)
        return flatten(payload)[0] != 0

    base = sent(7, 0, 0)
    assert int(base.sum()) == shared_count(0.3, base.numel())
    assert torch.equal(base, sent(7, 0, 0))
    for other in (sent(7, 1, 0), sent(7, 0, 1), sent(8, 0, 0)):
        assert not torch.equal(base, other)
    # seed=None takes the experiment seed from the context
    assert torch.equal(sent(None, 2, 1, ctx_seed=7), sent(7, 2, 1))
    # data-independent: a different delta gives the same selection
    assert torch.equal(random_mask(20, 5, 1, 2, 3), random_mask(20, 5, 1, 2, 3))


# ------------------------------------------------------------------ personalize


@pytest.mark.parametrize(
    "make", [lambda: PartialSharing(share=ENCODERS), lambda: PartialSharing(fraction=0.4)]
)
def test_personalize_puts_back_exactly_the_clients_local_values_and_does_not_mutate_input(make):
    ps = make()
    glob = state(seed=1)
    glob_copy = clone(glob)
    start = ps.personalize(glob, ctx_for(2).for_client(0))
    assert same(start, glob)  # first round: nothing kept yet
    delta = state(seed=2)
    ps.protect(delta, ctx_for(2).for_client(0))
    new_glob = state(seed=5)
    new_copy = clone(new_glob)
    start = ps.personalize(new_glob, ctx_for(2, rnd=1).for_client(0))
    assert same(new_glob, new_copy) and same(glob, glob_copy)
    local = apply(glob, delta)  # what client 0 ended round 0 with
    if ps.mode == "share":
        expected = {k: local[k] if k in LOCAL else new_glob[k] for k in SHAPES}
    else:
        masks = ps.kept_mask(0)
        expected = {
            k: torch.where(masks[k], local[k], new_glob[k]) if k in masks else new_glob[k] for k in SHAPES
        }
        n_kept = sum(int(m.sum()) for m in masks.values())
        assert n_kept == flatten(delta)[0].numel() - shared_count(0.4, flatten(delta)[0].numel())
    assert same(start, expected)
    # another client has nothing kept: plain global state
    assert same(ps.personalize(new_glob, ctx_for(2, rnd=1).for_client(1)), new_glob)
    # the returned tensors are the caller's: modifying them does not touch the client's memory
    for k, t in start.items():
        if t is not new_glob[k]:
            t.add_(100.0)
    assert same(ps.personalize(new_copy, ctx_for(2, rnd=1).for_client(0)), expected)


# ------------------------------------------------------------------ two simulated rounds


def synthetic_delta(cid: int, rnd: int) -> dict[str, torch.Tensor]:
    return {
        k: torch.full(s, float(10 * cid + rnd + 1)) * (1 + torch.arange(math.prod(s)).reshape(s))
        for k, s in SHAPES.items()
    }


def test_two_rounds_local_part_follows_own_updates_only_and_shared_keys_follow_the_aggregate():
    n = 3
    ps = PartialSharing(share=ENCODERS)
    init = state(seed=4)
    glob = clone(init)
    starts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    means = []
    for r in range(2):
        ctx = ctx_for(n, rnd=r, weights=[0.2, 0.3, 0.5])
        payloads = []
        for c in range(n):
            starts[r, c], p = round_trip(ps, glob, synthetic_delta(c, r), ctx, c)
            payloads.append(p)
        means.append(ps.aggregate(payloads, ctx))
        glob = apply(glob, means[-1], allow_missing=True)
    for c in range(n):
        # round 1 started from: shared keys = global after round 0; local keys = init + own round-0 delta
        for k in SHARED:
            assert torch.equal(starts[1, c][k], apply(init, means[0], allow_missing=True)[k])
        for k in LOCAL:
            assert torch.allclose(starts[1, c][k], init[k] + synthetic_delta(c, 0)[k])
            assert torch.allclose(
                ps.kept(c)[k], init[k] + synthetic_delta(c, 0)[k] + synthetic_delta(c, 1)[k]
            )
    for k in SHARED:
        expected = init[k] + sum(
            w * synthetic_delta(c, r)[k] for r in range(2) for c, w in enumerate([0.2, 0.3, 0.5])
        )
        assert torch.allclose(glob[k], expected)
    for k in LOCAL:
        assert torch.equal(glob[k], init[k])  # never aggregated


def test_two_rounds_fraction_mode_keeps_unshared_coordinates_local():
    ps = PartialSharing(fraction=0.5)
    init = state(seed=4)
    glob = clone(init)
    d0 = synthetic_delta(1, 0)
    _, p0 = round_trip(ps, glob, d0, ctx_for(1), 0)
    keep0 = ps.kept_mask(0)
    glob = apply(glob, ps.aggregate([p0], ctx_for(1)))
    start1 = ps.personalize(glob, ctx_for(1, rnd=1).for_client(0))
    for k in SHAPES:
        kept = keep0.get(k, torch.zeros(SHAPES[k], dtype=torch.bool))
        # shared coordinates moved globally by the delta; kept ones locally by the same delta
        assert torch.allclose(start1[k], init[k] + d0[k])
        assert torch.equal(glob[k][kept], init[k][kept])
    d1 = synthetic_delta(2, 1)
    round_trip(ps, glob, d1, ctx_for(1, rnd=1), 0)
    keep1 = ps.kept_mask(0)
    for k, m in keep1.items():
        assert torch.allclose(ps.kept(0)[k][m], (start1[k] + d1[k])[m])


# ------------------------------------------------------------------ dropouts, state


def test_dropped_clients_are_skipped_with_weights_renormalised():
    ps = PartialSharing(share=ENCODERS)
    ctx = ctx_for(3, weights=[0.2, 0.3, 0.5])
    payloads = [round_trip(ps, state(0.0), synthetic_delta(c, 0), ctx, c)[1] for c in range(3)]
    mean = ps.aggregate([payloads[0], None, payloads[2]], ctx)
    assert list(mean) == SHARED
    assert same(mean, weighted_mean([payloads[0], payloads[2]], [0.2, 0.5]))
    with pytest.raises(ValueError, match="dropped"):
        ps.aggregate([None, None, None], ctx)
    with pytest.raises(ValueError, match="payloads"):
        ps.aggregate(payloads[:2], ctx)
    with pytest.raises(InvalidUpdateError, match="stay local"):
        ps.aggregate([state(0.0)] * 3, ctx)


@pytest.mark.parametrize(
    "make",
    [lambda: PartialSharing(share=ENCODERS), lambda: PartialSharing(fraction=0.3, select="random", seed=3)],
)
def test_state_dict_round_trip_restores_every_clients_local_values(make):
    ps = make()
    glob = state(seed=1)
    for c in range(2):
        round_trip(ps, glob, synthetic_delta(c, 0), ctx_for(2), c)
    buf = io.BytesIO()
    torch.save(ps.state_dict(), buf)
    buf.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buf, weights_only=False))
    nxt = state(seed=8)
    for c in range(2):
        ctx = ctx_for(2, rnd=1).for_client(c)
        assert same(restored.personalize(nxt, ctx), ps.personalize(nxt, ctx))
    other = (
        PartialSharing(share=["global_branch.*"]) if ps.mode == "fraction" else PartialSharing(fraction=0.3)
    )
    with pytest.raises(ValueError, match="written by"):
        other.load_state_dict(ps.state_dict())
    with pytest.raises(ValueError, match="not a PartialSharing state"):
        make().load_state_dict({})


# ------------------------------------------------------------------ misuse


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({}, ValueError),
        ({"share": ENCODERS, "fraction": 0.5}, ValueError),
        ({"share": []}, ValueError),
        ({"share": [""]}, TypeError),
        ({"share": ENCODERS, "select": "random"}, ValueError),
        ({"fraction": 0.0}, ValueError),
        ({"fraction": -0.1}, ValueError),
        ({"fraction": 1.5}, ValueError),
        ({"fraction": float("nan")}, ValueError),
        ({"fraction": True}, TypeError),
        ({"fraction": "half"}, TypeError),
        ({"fraction": 0.5, "select": "bottomk"}, ValueError),
        ({"fraction": 0.5, "seed": 1}, ValueError),
    ],
)
def test_bad_parameters_raise(kwargs, err):
    with pytest.raises(err):
        PartialSharing(**kwargs)


def test_a_single_string_is_one_pattern():
    assert PartialSharing(share="head.*").patterns == ("head.*",)


def test_pattern_matching_nothing_raises_on_first_use():
    ps = PartialSharing(share=["global_branch.*", "global_encoder.*"])
    with pytest.raises(ValueError, match="global_encoder"):
        ps.personalize(state(0.0), ctx_for(1).for_client(0))
    with pytest.raises(ValueError, match="global_encoder"):
        ps.protect(state(0.0), ctx_for(1).for_client(0))


def test_misuse_of_the_client_side_raises_clearly():
    ps = PartialSharing(share=ENCODERS)
    with pytest.raises(ValueError, match="for_client"):
        ps.personalize(state(0.0), ctx_for(1))
    with pytest.raises(RuntimeError, match="personalize"):  # protect without personalize
        ps.protect(state(0.0), ctx_for(1).for_client(0))
    ps.personalize(state(0.0), ctx_for(2, rnd=0).for_client(0))
    with pytest.raises(RuntimeError, match="round 0"):  # stale start state
        ps.protect(state(0.0), ctx_for(2, rnd=1).for_client(0))
    glob = state(0.0)
    ps.personalize(glob, ctx_for(1).for_client(0))
    glob["head.weight"].add_(1.0)  # the start state changed under the client's feet
    with pytest.raises(RuntimeError, match="in place"):
        ps.protect(state(0.0), ctx_for(1).for_client(0))
    fr = PartialSharing(fraction=0.5)
    fr.personalize({"w": torch.zeros(3), "n": torch.zeros((), dtype=torch.long)}, ctx_for(1).for_client(0))
    with pytest.raises(InvalidUpdateError, match="floating"):
        fr.protect({"w": torch.ones(3), "n": torch.ones((), dtype=torch.long)}, ctx_for(1).for_client(0))
    fr.personalize({"w": torch.zeros(3)}, ctx_for(1).for_client(0))
    with pytest.raises(InvalidUpdateError, match="NaN"):
        fr.protect({"w": torch.tensor([1.0, float("nan"), 0.0])}, ctx_for(1).for_client(0))


# ------------------------------------------------------------------ composition


def test_clipping_applies_to_the_shared_parts_norm_only():
    c = 1.0
    delta = state(seed=6)
    for k in LOCAL:
        delta[k] = delta[k] * 1e3  # a huge local part must not shrink the shared part
    shared_norm = global_l2_norm({k: delta[k] for k in SHARED})
    assert shared_norm > c
    pipe = Compose(PartialSharing(share=ENCODERS), ClipUpdate(c))
    glob = state(0.0)
    pipe.personalize(glob, ctx_for(1).for_client(0))
    payload = pipe.protect(delta, ctx_for(1).for_client(0))
    assert list(payload) == SHARED
    assert global_l2_norm(payload) == pytest.approx(c, rel=1e-5)
    for k in SHARED:
        torch.testing.assert_close(payload[k], delta[k] * (c / shared_norm), rtol=1e-5, atol=1e-7)
    # the local part was kept unclipped
    torch.testing.assert_close(pipe.stages[0].kept(0)["head.weight"], delta["head.weight"])


def test_composes_with_clip_and_gaussian_noise_on_the_shared_part():
    ctx = ctx_for(2)
    pipe = Compose(
        PartialSharing(share=ENCODERS),
        ClipUpdate(0.5),
        GaussianMechanism(noise_multiplier=0.8, noise=SeededNoise(0)),
    )
    ref_clip, ref_noise = (
        ClipUpdate(0.5),
        GaussianMechanism(noise_multiplier=0.8, sensitivity=0.5, noise=SeededNoise(0)),
    )
    payloads = []
    for cid in range(2):
        delta = state(seed=10 + cid)
        pipe.personalize(state(0.0), ctx.for_client(cid))
        payload = pipe.protect(delta, ctx.for_client(cid))
        assert isinstance(payload, dict) and list(payload) == SHARED
        expected = ref_noise.protect(
            ref_clip.protect({k: delta[k] for k in SHARED}, ctx.for_client(cid)), ctx.for_client(cid)
        )
        assert same(payload, expected)  # exactly clip + noise of the shared part
        payloads.append(payload)
    mean = pipe.aggregate(payloads, ctx)
    assert list(mean) == SHARED
    assert pipe.accountant is not None and pipe.accountant.steps == 1


def test_compose_warns_when_partial_sharing_is_not_first():
    with pytest.warns(UserWarning, match="first stage"):
        Compose(ClipUpdate(1.0), PartialSharing(share=ENCODERS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Compose(PartialSharing(share=ENCODERS), ClipUpdate(1.0))


class _FlatSum(Defense):
    """Stands in for an aggregator that packs whatever dict it receives into one vector."""

    def protect(self, update, ctx):
        vec, spec = flatten(update)
        return (vec.clone(), spec)

    def aggregate(self, payloads, ctx):
        from privfl.updates import unflatten

        spec = payloads[0][1]
        return unflatten(sum(w * p[0].double() for w, p in zip(ctx.weights, payloads)), spec)


@pytest.mark.parametrize(
    "make", [lambda: PartialSharing(share=ENCODERS), lambda: PartialSharing(fraction=0.5)]
)
def test_works_in_front_of_a_flattening_aggregator(make):
    ctx = ctx_for(2)
    pipe = Compose(make(), _FlatSum())
    plain = make()
    payloads, plain_payloads = [], []
    for cid in range(2):
        delta = synthetic_delta(cid, 0)
        payloads.append(round_trip(pipe, state(0.0), delta, ctx, cid)[1])
        plain_payloads.append(round_trip(plain, state(0.0), delta, ctx, cid)[1])
    mean = pipe.aggregate(payloads, ctx)
    ref = plain.aggregate(plain_payloads, ctx)
    assert list(mean) == list(ref)
    for k in ref:
        torch.testing.assert_close(mean[k], ref[k])


# ------------------------------------------------------------------ in the FL loop


def test_run_federated_keeps_the_decoder_on_each_client():
    from privfl.data import SyntheticHistology, partition
    from privfl.fl import ClientConfig, run_federated
    from privfl.fl.client import trainable_state
    from privfl.models import build_model

    data = SyntheticHistology(16, size=32, seed=0, sites=2)
    torch.manual_seed(0)
    model = build_model("unet-tiny", num_classes=4)
    init = trainable_state(model)
    ps = PartialSharing(share=["down.*"])
    res = run_federated(
        model,
        partition(data, "iid", 2, seed=0),
        None,
        2,
        defense=ps,
        progress=False,
        config=ClientConfig(local_steps=1, batch_size=4),
        val_fraction=0.25,
    )
    encoder = [k for k in init if k.startswith("down.")]
    decoder = [k for k in init if k not in encoder]
    assert all(torch.equal(res.global_state[k], init[k]) for k in decoder)  # never aggregated
    assert any(not torch.equal(res.global_state[k], init[k]) for k in encoder)
    kept = [ps.kept(c) for c in range(2)]
    assert all(set(kc) == set(decoder) for kc in kept)
    assert any(not torch.equal(kept[0][k], kept[1][k]) for k in decoder)  # each client's own decoder
    assert all(len(rec["val"]) == 2 for rec in res.history)  # validated on the personalised models
