"""Browse and report on studies: trial notes and artifacts, study reports, best-model export."""
