"""fedspeech: privacy-preserving federated speech recognition (MFCC + BiGRU-CTC, DP-SGD, Flower, MLflow)."""

__version__ = "0.1.0"
