"""Distillation methods as plug-ins: a registry of name -> `Method` class (see `base`).

Built in: ``ce``, ``kd``, ``dkd``, ``gdkd`` (`logit`) and ``gendd`` (`gendd`). A new
method is one module in this package, or in another package that names it in
the entry-point group ``gendd_pipe.methods``.
"""

from gendd_pipe.distill.methods.base import (ENTRY_POINTS, Method, Phase, TeacherHead, create_method, get_method,
                                             load_error, method_names, register, sections, train_phase)

__all__ = ["ENTRY_POINTS", "Method", "Phase", "TeacherHead", "create_method", "get_method", "load_error",
           "method_names", "register", "sections", "train_phase"]
