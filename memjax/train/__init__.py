"""The train/eval loop."""
from memjax.train.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
