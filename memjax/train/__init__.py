"""The train/eval loop."""


def train_and_evaluate(cfg, workdir):
    """See :func:`memjax.train.loop.train_and_evaluate` (imported lazily: the loop pulls in Orbax)."""
    from memjax.train.loop import train_and_evaluate as run

    return run(cfg, workdir)


__all__ = ["train_and_evaluate"]
