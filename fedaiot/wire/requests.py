"""The keys of what the coordinator asks of a node, beyond Flower's own: a request's purpose
(a study's ``statistics`` or ``evaluation`` release), how many evaluations the run plans, and
the study it belongs to (``<id>@<version>``), which a node checks against its own file."""

PURPOSE, EVALUATIONS, STUDY_KEY = "purpose", "evaluations", "study-key"
