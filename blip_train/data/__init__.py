"""Data: MDS schema and converters, streaming readers and mixtures, transforms, tokenizers, collators.

Submodules are imported explicitly (e.g. `from blip_train.data.datasets import build_train_loader`):
importing this package stays cheap (no streaming/torchvision import) for the conversion tools.
See README.md in this folder.
"""
