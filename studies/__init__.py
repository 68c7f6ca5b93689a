"""Study specs: one TOML file per study in this folder, loaded and checked by studies.loader into studies.model."""
from studies.loader import list_studies, load_spec, spec_from_dict
from studies.model import STUDIES_DIR, ParamSpec, StudySpec, StudySpecError, grid_key

__all__ = ["STUDIES_DIR", "ParamSpec", "StudySpec", "StudySpecError", "grid_key", "list_studies", "load_spec",
           "spec_from_dict"]
