"""Study specs, the one name they had before the split: studies.model (StudySpec, ParamSpec, the samplers),
studies.loader (reading and checking a file) and studies.compare (a file against a study's recorded spec).
Every problem in a file is one StudySpecError whose message reads "<file>: <field>: <problem>".
"""
from studies.compare import OVERRIDES, RUNTIME_FIELDS, _normal, _result_fields, override_flag, spec_differences
from studies.loader import REFERENCE_METRICS, list_studies, load_spec, parse, spec_from_dict
from studies.model import (PRUNERS, REPO_DIR, SAMPLERS, STUDIES_DIR, GridSampler, ParamSpec, StudySpec,
                           StudySpecError, TrialSeededSampler, _display, grid_key, trial_seed)

__all__ = ["GridSampler", "OVERRIDES", "PRUNERS", "ParamSpec", "REFERENCE_METRICS", "REPO_DIR",
           "RUNTIME_FIELDS", "SAMPLERS", "STUDIES_DIR", "StudySpec", "StudySpecError", "TrialSeededSampler",
           "_display", "_normal", "_result_fields", "grid_key", "list_studies", "load_spec", "override_flag", "parse",
           "spec_differences", "spec_from_dict", "trial_seed"]
