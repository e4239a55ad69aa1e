"""ctmask: COVID-CT-Mask-Net from PyTorch to verified, fast inference."""

__version__ = "0.1.0"
