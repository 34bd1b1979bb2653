"""The tuning methods of ``--method``: what each is called, what it can do, where its model is built.

Importable without torch (the model code is named by import path and loaded on first use), so that flags can be
checked and runs named before anything heavy is imported. :mod:`methods.registry` is the mechanism,
:mod:`methods.builtin` the one line per method.
"""
from . import builtin  # noqa: F401 - registers DTL / DTL+ and the baselines
from .registry import (CAPABILITIES, LEAN_SUFFIX, Method, Ref, featured_results_names, get_method, method_names,
                       methods_with, parse_label, register_method, results_names)

__all__ = ["Method", "Ref", "register_method", "get_method", "method_names", "methods_with", "results_names",
           "featured_results_names", "parse_label", "CAPABILITIES", "LEAN_SUFFIX"]
