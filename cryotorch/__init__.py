"""cryotorch: PyTorch-native cryo-EM structure determination."""

__version__ = "0.1.0"
