"""Step-by-step decoding reproduces the full forward pass, for every registered block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.config import ModelConfig
from memjax.model.decode import generate
from memjax.model.lm import LM
from memjax.nn.registry import known_names


# The default run decodes the blocks below through the model (scanned layers, stacked caches); every
# other registered block is decoded here in the slow run only (`pytest -m slow`). Those either share
# their decoding code with a block listed (linear_attn, gla, deltanet: gated_deltanet's
# AssociativeCache path; hgrn2: gla_vec's; titans_mal: titans_mag's), keep no state across tokens
# (pkm, memory_plus, stem_ffn, mlp), or are decoded by a default test in their own file
# (test_mixture_block, test_ssm_blocks, test_mamba1, test_fox, test_episodic, test_miras, test_move,
# test_pararnn, and test_dplr for rwkv7: DPLR with token shift, a third of the time through the model), or share their cache kind with one listed (kda, gdn2, gated_deltaproduct, rwkv6,
# mlstm, hopfield: a matrix state; log_linear_gdn: the Fenwick stack; s4d, ngram_mem, titans_mac).
# A new block gets its default decode test in its own file; `-m slow` decodes every block here.
# One block per kind of cache: KV (attention), matrix state (gated_deltanet; gla_vec's vector decay
# uses the same cache and is slow), SSM with rotations and a trapezoid carry (mamba3), a Fenwick stack of states
# (log_linear_mamba2), neural memory with a window (titans_mag).
DEFAULT = {"attention", "gated_deltanet", "log_linear_mamba2", "mamba3", "titans_mag"}


def _blocks():
    return [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow)
            for n in sorted(n for n in known_names() if "=" not in n)]


@pytest.mark.parametrize("block", _blocks())
def test_prefill_then_step_equals_full_forward(block):
    # two repeats: scanned layers (stacked caches) wherever the block can be stacked
    cfg = ModelConfig(vocab_size=48, d_model=32, num_heads=2, pattern=f"{block},F", pattern_repeat=2, max_seq_len=64)
    model = LM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, 48)
    # Jitted: one compile per entry point instead of op-by-op dispatch of every decoding step.
    full = nnx.jit(lambda m, x: m(x))(model, tokens)
    cache = model.init_cache(2, 32)
    run = nnx.jit(lambda m, x, c: m(x, cache=c))  # one compile for the prompt, one for the steps
    logits, cache = run(model, tokens[:, :13], cache)
    outs = [logits]
    for t in range(13, 21):
        lt, cache = run(model, tokens[:, t:t + 1], cache)
        outs.append(lt)
    dec = jnp.concatenate(outs, axis=1)
    scale = float(jnp.abs(full).max())
    np.testing.assert_allclose(dec, full, atol=2e-4 * scale, rtol=0)


@pytest.mark.slow
def test_generate_greedy_matches_argmax_of_forward():
    pattern = ",".join(b for b in ("A", "D", "M2", "F") if b in {n.split("=")[0] for n in known_names()})
    cfg = ModelConfig(vocab_size=48, d_model=32, num_heads=2, pattern=pattern)
    model = LM(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 48)
    out = generate(model, prompt, 6)
    assert out.shape == (2, 6)
    seq = prompt
    forward = nnx.jit(lambda m, x: m(x))
    for i in range(6):  # greedy by repeated full forward passes
        nxt = jnp.argmax(forward(model, seq)[:, -1], -1)
        assert (nxt == out[:, i]).all()
        seq = jnp.concatenate([seq, nxt[:, None]], 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, 0)
