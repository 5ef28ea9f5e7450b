"""Small configs shared by the training tests."""
import jax
import jax.numpy as jnp

from memjax.config import Config


def tiny_config(pattern: str = "A,A", **train) -> Config:
    cfg = Config(name="tiny")
    cfg.model.vocab_size = 64
    cfg.model.d_model = 32
    cfg.model.num_heads = 2
    cfg.model.pattern = pattern
    cfg.data.seq_len = 32
    cfg.data.options = {"num_kv_pairs": 4}
    cfg.data.num_train_examples = 2_000
    cfg.data.num_eval_examples = 64
    cfg.optim.learning_rate = 3e-3
    cfg.optim.warmup_steps = 5
    cfg.train.batch_size = 16
    cfg.train.steps = 8
    cfg.train.eval_every = 1000
    cfg.train.eval_batches = 2
    cfg.train.log_every = 4
    cfg.train.checkpoint_every = 4
    cfg.train.progress = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def mqar_losses(model_cfg, *, steps: int, lr: float, batch: int = 16, seq_len: int = 32) -> list[float]:
    """Train an LM of ``model_cfg`` with Adam on 4-pair MQAR; return the per-step masked losses."""
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from memjax.data.mqar import MQAR
    from memjax.model.lm import LM
    from memjax.train.loop import masked_xent

    task = MQAR(MQAR.Options(num_kv_pairs=4), seq_len=seq_len, vocab_size=model_cfg.vocab_size,
                split="train", num_examples=batch * steps, seed=0)
    model = LM(model_cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, inputs, targets, mask):
        def loss_fn(model):
            nll, _, n = masked_xent(model(inputs), targets, mask)
            return nll / n

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = []
    for i in range(steps):
        ex = [task[j] for j in range(batch * i, batch * (i + 1))]
        b = {k: jnp.asarray(np.stack([e[k] for e in ex])) for k in ("inputs", "targets", "mask")}
        losses.append(float(train_step(model, opt, b["inputs"], b["targets"], b["mask"])))
    return losses


def mqar_first_last(pattern: str, blocks: dict, *, steps: int = 60, lr: float = 3e-3) -> tuple[float, float]:
    """Mean loss of the first and of the last 5 steps of a 2-layer ``pattern`` model on MQAR."""
    import numpy as np

    from memjax.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern=pattern, blocks=blocks)
    losses = mqar_losses(cfg, steps=steps, lr=lr)
    assert np.all(np.isfinite(losses))
    return float(np.mean(losses[:5])), float(np.mean(losses[-5:]))


def copy_to_scanned(unscanned: dict, group: int, repeat: int) -> dict:
    """The unscanned parameter tree in the scanned layout (layer i*group + j -> stack slot j, row i)."""
    out = {k: v for k, v in unscanned.items() if k not in ("blocks", "norms")}
    out["stack"] = {part: {j: jax.tree.map(lambda *xs: jnp.stack(xs),
                                           *[unscanned[part][i * group + j] for i in range(repeat)])
                           for j in range(group)} for part in ("blocks", "norms")}
    return out
