"""gptfn's export suite: TorchScript and torch.export / AOTInductor artifacts, each verified
against eager gptfn before it is kept. Run as ``python -m export KIND --model ... --out ...``.
"""
