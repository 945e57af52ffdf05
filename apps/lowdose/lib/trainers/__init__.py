from .finetune import FineTuneTask

__all__ = ["FineTuneTask"]
