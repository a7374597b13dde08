"""nlp_transfer: a Hydra + PyTorch Lightning template for transfer learning in NLP."""

__version__ = "0.1.0"
