"""The command line of ``train.py``: flags (:mod:`cli.flags`, no torch) and the typed specs built from them
(:mod:`cli.specs`). The top of the layers: ``utils < data, models < engine < cli < train.py / tools``."""
