"""Study specs: one TOML file per study in this folder, loaded and validated by studies.spec."""
from studies.spec import (STUDIES_DIR, ParamSpec, StudySpec, StudySpecError, grid_key, list_studies, load_spec,
                          spec_from_dict)

__all__ = ["STUDIES_DIR", "ParamSpec", "StudySpec", "StudySpecError", "grid_key", "list_studies", "load_spec",
           "spec_from_dict"]
