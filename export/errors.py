"""The export suite's own error, importable without torch (the command line catches it even
when an interrupt lands while torch is still being imported)."""


class VerificationError(RuntimeError):
    """An artifact that does not compute what eager gptfn computes."""
