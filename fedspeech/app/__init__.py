"""The application floor: the `fedspeech` CLI, `simulate`/`demo`, the Flower launcher, pre-flight.

Everything here may import the core (``fedspeech``), the adapters (``fedspeech_client``,
``fedspeech_server``) and ``fedspeech_features``; nothing below imports this package
(``tests/test_architecture.py``).
"""
