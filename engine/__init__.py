"""The pieces ``train.py`` composes: the data and model of a run (:mod:`engine.setup`), the training/evaluation
loop of one model (:mod:`engine.trainer`) and the run folder with its resume state (:mod:`engine.run_folder`)."""
