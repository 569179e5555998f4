"""Generation loop, KV cache bookkeeping and stop strings, on a tiny random model."""

import pytest
import torch

from tinychat.cache import ContextFullError
from tinychat.config import ModelConfig
from tinychat.generate import StopStringMatcher, generate_step, prefill
from tinychat.loader import build_model, fused_state_dict
from tinychat.models import hf_shapes
from tinychat.sampling import greedy

CONFIG = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig.from_dict(CONFIG)
    hf = {name: torch.randn(shape) * (0.2 if len(shape) == 2 else 1.0)
          for name, shape in hf_shapes(config).items()}
    return build_model(config, fused_state_dict(hf.__getitem__, config, torch.float32, torch.device("cpu")))


def greedy_reference(model, prompt, n):
    """Greedy decoding by full forwards, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_generate_step_matches_full_forward_greedy(model):
    prompt = torch.randint(0, 97, (11,)).tolist()
    cache = model.make_cache(64)
    got = list(generate_step(model, prompt, cache, greedy, max_tokens=8))
    assert got == greedy_reference(model, prompt, 8)
    assert cache.offset == len(prompt) + 7  # the last token is never fed back


def test_stops_when_cache_is_full_and_refuses_too_long_prompts(model):
    cache = model.make_cache(16)
    out = list(generate_step(model, list(range(1, 11)), cache, greedy, max_tokens=50))
    assert len(out) == 7 and cache.room == 0
    with pytest.raises(ContextFullError, match="context"):
        list(generate_step(model, list(range(1, 20)), model.make_cache(16), greedy, max_tokens=2))


def test_second_turn_prefills_only_the_new_tokens(model):
    cache = model.make_cache(64)
    first = list(range(3, 20))
    with torch.inference_mode():
        _, n1 = prefill(model, cache, first)
        full = list(range(3, 20)) + [40, 41, 42]
        logits, n2 = prefill(model, cache, full)
        expected = model(torch.tensor([full]))[:, -1]
    assert (n1, n2) == (17, 3)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_prefix_reuse_after_divergence_trims_the_cache(model):
    cache = model.make_cache(64)
    with torch.inference_mode():
        prefill(model, cache, [5, 6, 7, 8, 9])
        logits, n = prefill(model, cache, [5, 6, 70, 71])
        expected = model(torch.tensor([[5, 6, 70, 71]]))[:, -1]
    assert n == 2 and cache.token_ids == [5, 6, 70, 71]
    assert torch.allclose(logits, expected, atol=1e-4)


def test_stop_string_matcher_holds_back_partial_matches():
    m = StopStringMatcher(["</s>", "STOP"])
    assert m.feed("Hello </") == ("Hello ", False)
    assert m.feed("b> ST") == ("</b> ", False)
    assert m.feed("OP and more") == ("", True)
    m = StopStringMatcher(["\n\n"])
    assert m.feed("a\n") == ("a", False)
    assert m.feed("b") == ("\nb", False)
    assert m.flush() == ""


class LookaheadDecoder:
    """The eager step with lookahead on, as the CUDA-graph decoder has it: the next step is queued before
    the host reads the token."""

    lookahead = True

    def __init__(self):
        from tinychat.generate import EagerDecoder

        self.eager, self.steps = EagerDecoder(), 0

    def bind(self, model, cache, sampler, processors=()):
        step, sample = self.eager.bind(model, cache, sampler, processors)

        def counted(token, position):
            self.steps += 1
            return step(token, position)

        return counted, sample


def test_lookahead_decoding_gives_the_same_tokens_and_cache(model):
    prompt = torch.randint(0, 97, (9,)).tolist()
    plain = model.make_cache(64)
    want = list(generate_step(model, prompt, plain, greedy, max_tokens=10))
    decoder, cache = LookaheadDecoder(), model.make_cache(64)
    assert list(generate_step(model, prompt, cache, greedy, max_tokens=10, decoder=decoder)) == want
    assert cache.offset == plain.offset and cache.token_ids == plain.token_ids
    assert decoder.steps == 9  # never a step past max_tokens


def test_lookahead_decoding_stopped_early_keeps_the_cache_consistent(model):
    """A consumer that stops at a token (EOS, a stop string) leaves the cache holding what it took before:
    the step queued for the next token wrote past the offset, which nothing reads."""
    prompt = torch.randint(0, 97, (9,)).tolist()
    cache = model.make_cache(64)
    steps = generate_step(model, prompt, cache, greedy, max_tokens=10, decoder=LookaheadDecoder())
    taken = [next(steps) for _ in range(4)]
    steps.close()
    assert cache.offset == len(prompt) + 3 and cache.token_ids == prompt + taken[:3]
    again = list(generate_step(model, prompt + taken, cache, greedy, max_tokens=3))
    assert again == list(generate_step(model, prompt + taken, model.make_cache(64), greedy, max_tokens=3))
