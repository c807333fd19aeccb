"""Exceptions that the ``gptfn`` command turns into one line (kept free of torch, so the
command imports torch only for the subcommands that need it)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after it saved a checkpoint at the current step."""
