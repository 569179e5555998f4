import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tinychat.errors import TinychatError
from tinychat.sampling import (
    SamplingParams,
    apply_frequency_presence,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    categorical,
    greedy,
    make_logits_processors,
    make_sampler,
)

FAST = settings(max_examples=30, deadline=None)
N_DRAWS = 20_000


# ---------------------------------------------------------------- helpers

def random_logits(seed: int, batch: int, vocab: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3.0
    if ties:  # coarse values so that equal logits are common
        logits = logits.round()
    return logits


def support(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def ranked(row: list[float]) -> list[int]:
    """Token ids by descending logit, ties by lower id: the documented tie rule."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


def softmax64(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    s = sum(e)
    return [x / s for x in e]


def ref_top_p(row: list[float], p: float, margin: float = 0.0) -> set[int]:
    probs = softmax64(row)
    kept, cum = set(), 0.0
    for i in ranked(row):
        kept.add(i)
        cum += probs[i]
        if margin:
            assume(abs(cum - p) > margin)  # too close to call in fp32
        if cum >= p:
            break
    return kept


def assert_frequencies(ids: torch.Tensor, logits_row: torch.Tensor) -> None:
    """Chi-square over the support, rare ids pooled; the bound is loose (p-value ~1e-8)."""
    vocab = logits_row.shape[-1]
    probs = torch.softmax(logits_row.double(), dim=-1)
    counts = torch.bincount(ids, minlength=vocab).double()
    expected = probs * ids.numel()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    exp = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    nonempty = exp > 0
    obs, exp = obs[nonempty], exp[nonempty]
    df = max(int(nonempty.sum()) - 1, 1)
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < df + 8 * math.sqrt(2 * df) + 8, (chi2, df)


# ---------------------------------------------------------------- top-k

@FAST
@given(seed=st.integers(0, 2**31), vocab=st.integers(2, 40), k=st.integers(1, 50), ties=st.booleans())
def test_top_k_keeps_exactly_the_k_best(seed, vocab, k, ties):
    logits = random_logits(seed, 3, vocab, ties)
    out = apply_top_k(logits, k)
    for row, kept in zip(logits.tolist(), support(out)):
        assert kept == set(ranked(row)[:k])
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite])


def test_top_k_ties_prefer_lower_ids():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert support(apply_top_k(logits, 2)) == [{1, 2}]
    assert support(apply_top_k(logits, 4)) == [{1, 2, 3, 4}]


def test_top_k_larger_than_vocab_or_zero_keeps_all():
    logits = random_logits(1, 2, 7)
    for k in (0, 7, 8, 1000):
        out = apply_top_k(logits, k)
        assert torch.equal(out, logits)
        assert out is not logits


# ---------------------------------------------------------------- top-p

def shuffled_probs_logits(probs: list[float], perm: list[int]) -> torch.Tensor:
    return torch.log(torch.tensor([probs[i] for i in perm])).unsqueeze(0)


@pytest.mark.parametrize("perm", [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]])
def test_top_p_cumulative_exactly_at_p_stops_there(perm):
    probs = [0.5, 0.25, 0.125, 0.125]
    logits = shuffled_probs_logits(probs, perm)
    pos = {orig: new for new, orig in enumerate(perm)}  # original rank -> token id

    def ids(*ranks):
        return {pos[r] for r in ranks}

    assert support(apply_top_p(logits, 0.5)) == [ids(0)]
    assert support(apply_top_p(logits, 0.75)) == [ids(0, 1)]
    assert support(apply_top_p(logits, 0.7501)) == [ids(0, 1, 2) if perm.index(2) < perm.index(3) else ids(0, 1, 3)]
    assert support(apply_top_p(logits, 0.4999)) == [ids(0)]
    assert support(apply_top_p(logits, 1e-9)) == [ids(0)]


@pytest.mark.parametrize("probs,p,n_kept", [
    ([0.1] * 10, 0.6, 6),  # the fp32 mass of the first six lands just below 0.6
    ([0.05] * 20, 0.3, 6),  # likewise below 0.3
    ([0.4, 0.3, 0.2, 0.1], 0.9, 3),
    ([0.4, 0.3, 0.2, 0.1], 0.7, 2),
    ([0.1] * 10, 0.7, 7),
    ([0.05] * 20, 0.95, 19),
])
def test_top_p_decimal_boundaries_survive_fp32_rounding(probs, p, n_kept):
    perm = torch.randperm(len(probs)).tolist()
    logits = shuffled_probs_logits(probs, perm)
    (kept,) = support(apply_top_p(logits, p))
    assert kept == set(ranked(logits[0].tolist())[:n_kept])


def test_top_p_ties_prefer_lower_ids_and_keep_the_top_token():
    uniform = torch.zeros(1, 4) + torch.randn(1)  # any constant row
    assert support(apply_top_p(uniform, 0.5)) == [{0, 1}]
    assert support(apply_top_p(uniform, 0.6)) == [{0, 1, 2}]
    peaked = torch.tensor([[0.0, 20.0, 0.0]])
    assert support(apply_top_p(peaked, 1e-6)) == [{1}]


def test_top_p_one_keeps_all():
    logits = random_logits(2, 3, 50)
    out = apply_top_p(logits, 1.0)
    assert torch.equal(out, logits)


@FAST
@given(seed=st.integers(0, 2**31), vocab=st.integers(1, 40), p=st.floats(0.01, 0.999), ties=st.booleans())
def test_top_p_matches_reference(seed, vocab, p, ties):
    logits = random_logits(seed, 2, vocab, ties)
    out = apply_top_p(logits, p)
    for row, kept in zip(logits.tolist(), support(out)):
        assert kept == ref_top_p(row, p, margin=1e-4)


# ---------------------------------------------------------------- min-p

def test_min_p_boundary_is_kept():
    top = torch.tensor(1.5)
    at = top + math.log(0.2)
    logits = torch.stack([top, at, at - 1e-3, at + 1e-3, top - 10]).unsqueeze(0)
    assert support(apply_min_p(logits, 0.2)) == [{0, 1, 3}]
    assert torch.equal(apply_min_p(logits, 0.0), logits)


@FAST
@given(seed=st.integers(0, 2**31), vocab=st.integers(1, 40), min_p=st.floats(0.001, 0.999))
def test_min_p_matches_reference(seed, vocab, min_p):
    logits = random_logits(seed, 2, vocab)
    out = apply_min_p(logits, min_p)
    for row, kept in zip(logits.tolist(), support(out)):
        probs = softmax64(row)
        ratios = [q / max(probs) for q in probs]
        assume(all(abs(r - min_p) > 1e-4 for r in ratios))
        assert kept == {i for i, r in enumerate(ratios) if r >= min_p}
        assert ranked(row)[0] in kept


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_filters_accept_any_float_dtype_and_return_fp32(dtype):
    logits = random_logits(3, 2, 30).to(dtype)
    ref = logits.float()
    for fn, arg in ((apply_top_k, 5), (apply_top_p, 0.8), (apply_min_p, 0.1)):
        out = fn(logits, arg)
        assert out.dtype == torch.float32
        assert support(out) == support(fn(ref, arg))
    hist = torch.tensor([0, 3])
    assert apply_repetition_penalty(logits, hist, 1.3).dtype == torch.float32
    assert greedy(logits).tolist() == greedy(ref).tolist()
    assert categorical(logits, torch.Generator().manual_seed(0)).shape == (2,)


# ---------------------------------------------------------------- repetition penalty

def test_repetition_penalty_sign_handling_and_duplicates_count_once():
    logits = torch.tensor([[2.0, -2.0, 0.0, 1.0, -1.0]])
    before = logits.clone()
    history = torch.tensor([0, 1, 2, 0, 0, 1])
    out = apply_repetition_penalty(logits, history, 2.0)
    assert out.tolist() == [[1.0, -4.0, 0.0, 1.0, -1.0]]
    out = apply_repetition_penalty(logits, history, 0.5)
    assert out.tolist() == [[4.0, -1.0, 0.0, 1.0, -1.0]]
    assert torch.equal(logits, before)  # pure: the input is not touched


@FAST
@given(seed=st.integers(0, 2**31), vocab=st.integers(2, 30), seq=st.integers(0, 20),
       penalty=st.floats(0.1, 5.0))
def test_repetition_penalty_per_row_history(seed, vocab, seq, penalty):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, vocab, generator=g) * 3
    history = torch.randint(0, vocab, (3, seq), generator=g)
    out = apply_repetition_penalty(logits, history, penalty)
    for row, hist, new in zip(logits.tolist(), history.tolist(), out.tolist()):
        for i, (x, y) in enumerate(zip(row, new)):
            if i not in hist:
                assert y == x
            elif x > 0:
                assert y == pytest.approx(x / penalty, rel=1e-6)
            else:
                assert y == pytest.approx(x * penalty, rel=1e-6)


def test_logits_processors():
    assert make_logits_processors(SamplingParams(repetition_penalty=1.0)) == []
    (proc,) = make_logits_processors(SamplingParams(repetition_penalty=1.5))
    logits = random_logits(4, 2, 10)
    hist = torch.tensor([[1, 2], [3, 3]])
    assert torch.equal(proc(hist, logits), apply_repetition_penalty(logits, hist, 1.5))


# ---------------------------------------------------------------- greedy / sampler

@FAST
@given(seed=st.integers(0, 2**31), vocab=st.integers(1, 50), ties=st.booleans())
def test_temperature_zero_is_argmax(seed, vocab, ties):
    logits = random_logits(seed, 4, vocab, ties)
    sample = make_sampler(SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=seed))
    ids = sample(logits)
    assert ids.tolist() == [ranked(row)[0] for row in logits.tolist()]
    assert torch.equal(ids, torch.argmax(logits, dim=-1))


def test_sampler_shape_dtype():
    logits = random_logits(5, 6, 100).to(torch.bfloat16)
    ids = make_sampler(SamplingParams(temperature=1.0, top_k=10, seed=0))(logits)
    assert ids.shape == (6,) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < 100


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), vocab=st.integers(2, 30))
def test_categorical_frequencies(seed, vocab):
    row = random_logits(seed, 1, vocab)[0]
    ids = categorical(row.expand(N_DRAWS, vocab), torch.Generator().manual_seed(seed))
    assert_frequencies(ids, row)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), vocab=st.integers(2, 30), temperature=st.floats(0.3, 2.0),
       top_k=st.integers(0, 30), top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.5), ties=st.booleans())
def test_sampler_only_draws_allowed_ids_with_right_frequencies(seed, vocab, temperature, top_k, top_p, min_p, ties):
    row = random_logits(seed, 1, vocab, ties)[0]
    # Reference chain in float64 on Python lists, using the documented rules.
    scaled = [x / temperature for x in row.tolist()]
    allowed = set(ranked(scaled)[:top_k]) if top_k else set(range(vocab))
    masked = [x if i in allowed else -math.inf for i, x in enumerate(scaled)]
    if top_p < 1.0:
        allowed &= ref_top_p(masked, top_p, margin=1e-4)
    masked = [x if i in allowed else -math.inf for i, x in enumerate(scaled)]
    if min_p > 0:
        probs = softmax64(masked)
        ratios = [q / max(probs) for q in probs]
        assume(all(abs(r - min_p) > 1e-4 for r in ratios))
        allowed &= {i for i, r in enumerate(ratios) if r >= min_p}
    target = torch.tensor([x if i in allowed else -math.inf for i, x in enumerate(scaled)])

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    ids = make_sampler(params)(row.expand(N_DRAWS, vocab))
    assert set(ids.tolist()) <= allowed
    assert_frequencies(ids, target)


def test_seed_reproduces_and_different_seeds_differ():
    logits = random_logits(6, 500, 20, ties=True)

    def run(seed):
        sample = make_sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
        return [sample(logits) for _ in range(3)]

    a, b, c = run(123), run(123), run(124)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # the generator advances between steps


def test_no_seed_still_samples_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = make_sampler(SamplingParams(temperature=1.0))(random_logits(7, 500, 20))
    b = make_sampler(SamplingParams(temperature=1.0))(random_logits(7, 500, 20))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(a, b)


def test_sampler_never_reads_back_to_host(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("host sync inside the sampler")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    monkeypatch.setattr(torch, "multinomial", boom)
    logits = random_logits(8, 4, 64)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=1)
    (proc,) = make_logits_processors(params)
    make_sampler(params)(proc(torch.tensor([[1, 2, 3]] * 4), logits))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampler_has_no_sync_and_is_reproducible():
    logits = random_logits(9, 8, 32_000).cuda().half()
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=3)
    (proc,) = make_logits_processors(params)
    history = torch.randint(0, 32_000, (8, 40), device="cuda")

    def run():
        sample = make_sampler(params)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return [sample(proc(history, logits)) for _ in range(3)]
        finally:
            torch.cuda.set_sync_debug_mode("default")

    a, b = run(), run()
    assert a[0].device.type == "cuda"
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("field,value,flag", [
    ("temperature", -0.1, "--temperature"),
    ("temperature", float("nan"), "--temperature"),
    ("top_p", 0.0, "--top-p"),
    ("top_p", 1.5, "--top-p"),
    ("top_p", -0.2, "--top-p"),
    ("top_k", -1, "--top-k"),
    ("top_k", 2.5, "--top-k"),
    ("min_p", -0.1, "--min-p"),
    ("min_p", 1.0, "--min-p"),
    ("repetition_penalty", 0.0, "--repetition-penalty"),
    ("repetition_penalty", -1.0, "--repetition-penalty"),
    ("repetition_penalty", float("inf"), "--repetition-penalty"),
    ("max_tokens", 0, "--max-tokens"),
    ("seed", "abc", "--seed"),
])
def test_validation_names_the_flag(field, value, flag):
    params = SamplingParams(**{field: value})
    with pytest.raises(TinychatError) as info:
        params.validate()
    msg = str(info.value)
    assert msg.startswith(flag) and repr(value) in msg and "\n" not in msg
    with pytest.raises(TinychatError):
        make_sampler(params)


def test_top_p_message():
    with pytest.raises(TinychatError, match=r"--top-p must be in \(0, 1\], got 1\.5"):
        SamplingParams(top_p=1.5).validate()


def test_valid_params_pass():
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, seed=0, max_tokens=1).validate()
    SamplingParams(temperature=2.0, top_p=1e-3, top_k=100_000, min_p=0.999, repetition_penalty=0.5).validate()


# ---------------------------------------------------------------- OpenAI frequency / presence penalties

def test_frequency_presence_penalty_matches_openai_formula():
    logits = random_logits(11, 2, 12)
    history = torch.tensor([[3, 3, 5, 7], [1, 1, 1, 0]])
    out = apply_frequency_presence(logits, history, 0.5, 0.25)
    for row, hist, new in zip(logits.tolist(), history.tolist(), out.tolist()):
        for i, (x, y) in enumerate(zip(row, new)):
            count = hist.count(i)
            assert y == pytest.approx(x - 0.5 * count - 0.25 * (count > 0), abs=1e-6)


def test_frequency_presence_processor_counts_the_reply_only():
    (proc,) = make_logits_processors(SamplingParams(frequency_penalty=1.0, presence_penalty=0.5))
    logits = random_logits(12, 1, 10)
    prompt = torch.tensor([[2, 2, 2]])
    assert torch.equal(proc(prompt, logits), logits.float())  # the first call sees the prompt: nothing yet
    out = proc(torch.tensor([[2, 2, 2, 4, 4]]), logits)
    want = logits.float().clone()
    want[0, 4] -= 2 * 1.0 + 0.5
    assert torch.allclose(out, want)


@pytest.mark.parametrize("name,value", [("frequency_penalty", 2.5), ("presence_penalty", -3.0),
                                        ("frequency_penalty", float("nan"))])
def test_frequency_presence_ranges(name, value):
    with pytest.raises(TinychatError, match=name.replace("_", "-")):
        SamplingParams(**{name: value}).validate()


# ------------------------------------------------------------- the CPU kernels behind the filters

@pytest.mark.parametrize("scale,p", [(5.0, 0.9), (2.0, 0.95), (1.0, 0.5), (8.0, 0.999), (0.1, 0.3)])
def test_the_cpu_top_p_kernel_keeps_what_the_full_sort_keeps(monkeypatch, scale, p):
    """ops.top_p sorts only the head of the ranking (the CPU kernel); torch's full stable sort is the rule.
    A model-sized vocabulary, peaked to flat, with ties."""
    from tinychat import ops

    logits = torch.randn(3, 49152) * scale
    logits[1, 100:140] = logits[1].max()  # tied maxima
    logits[2, ::7] = -math.inf
    fast = apply_top_p(logits, p)
    monkeypatch.setattr(ops, "top_p", lambda *a: None)
    full = apply_top_p(logits, p)
    # kept tokens hold the logits they had; the two may differ only where the mass above a token is within
    # fp32 rounding of p (both sum thousands of probabilities, in different orders)
    for row, a, b in zip(logits, fast, full):
        assert torch.equal(a[torch.isfinite(a)], row[torch.isfinite(a)])
        order = torch.sort(row, descending=True, stable=True).indices
        probs = torch.softmax(row.double(), dim=0)[order]
        above = torch.cumsum(probs, dim=0) - probs
        differ = (torch.isfinite(a) != torch.isfinite(b))[order]
        assert differ.sum() <= 2 and ((above[differ] - p).abs() < 1e-4).all()


@pytest.mark.parametrize("k", [1, 40, 1000])
def test_top_k_without_a_full_sort_keeps_the_lowest_tied_ids(k):
    logits = torch.randn(2, 49152).round()  # thousands of ties at every value
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices  # the rule: a stable full sort
    want = torch.full_like(logits, -math.inf).scatter_(-1, order[:, :k], logits.gather(-1, order[:, :k]))
    assert torch.equal(apply_top_k(logits, k), want)


@pytest.mark.parametrize("u", [0.0, 1.0 - 2**-24])
def test_the_draw_never_lands_on_a_removed_token_at_the_ends(monkeypatch, u):
    """u at either end of [0, 1) with the first and last tokens removed: the draw stays on allowed ones."""
    logits = torch.randn(3, 1000)
    logits[:, 0] = logits[:, -1] = -math.inf
    logits[1, :500] = -math.inf
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, u, dtype=kw.get("dtype")))
    drawn = categorical(logits)
    assert torch.isfinite(logits.gather(-1, drawn[:, None])).all()
