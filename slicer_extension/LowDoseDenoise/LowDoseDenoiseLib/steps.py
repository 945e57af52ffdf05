"""The sampling steps of a diffusion model (the server's ``dose_diffusion``): an integer from 1 to 4, each step one
more pass of the network. The server says each model's own number (``ModelInfo.sampling_steps``; None for a model
that is not a diffusion model, which takes no steps); the menu marks it "(model default)"."""

from __future__ import annotations

from collections.abc import Sequence

MAX_STEPS = 4  # the server refuses more (the few-step sampler is trained for 1 to 4)
STEPS_CHOICES: Sequence[int] = tuple(range(1, MAX_STEPS + 1))
DEFAULT_MARK = "(model default)"


def check_steps(steps) -> int | None:
    """``steps`` when it is None (the model's own) or an integer from 1 to 4, as the server accepts them; a bool,
    a text or a float is refused too. ValueError naming the steps else."""
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"sampling steps must be an integer from 1 to {MAX_STEPS}; got {steps!r}")
    return steps


def steps_label(steps: int, default: int | None) -> str:
    """The steps menu's text for a choice: "1", or "2 (model default)" for the model's own number."""
    return f"{steps} {DEFAULT_MARK}" if steps == default else str(steps)


def steps_choice(text) -> int:
    """The steps behind one of the menu's texts ("2 (model default)" -> 2); ValueError naming the steps else."""
    word = str(text or "").strip().split(" ", 1)[0]
    if not (word.isascii() and word.isdigit()):
        raise ValueError(f"sampling steps must be an integer from 1 to {MAX_STEPS}; got {text!r}")
    return check_steps(int(word))


def steps_name(steps: int) -> str:
    """The steps in a volume's name: "1step", "4steps"."""
    return f"{steps}step" if steps == 1 else f"{steps}steps"


def steps_used(steps: int | None, default: int | None) -> int | None:
    """The sampling steps a request samples in: ``steps`` when asked for, else the model's own ``default`` (None
    for a model that takes none)."""
    return default if steps is None else steps
