"""Studies: an institution's own table, described once for everyone in a study file.

``spec`` (the study file: features, label, model, evaluation split, quality rules), ``table``
(a CSV or Parquet file read and checked against it), ``encoding`` (the model's inputs, and the
statistics the nodes compute together for them), ``task`` (a study as a task), ``draft`` (a
study file drafted from a table). May import ``errors``, ``tasks`` and ``config``.
"""
