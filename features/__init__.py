"""Audio I/O, MFCC features, text tokenizer, manifests, corpus builders and partitioning.

This package never imports ``flwr`` or ``mlflow``: it is the plain data stage every client runs.
"""
