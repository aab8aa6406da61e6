"""The report: a pure function of run directories (never trains, never needs the data set).

`build_report(results)` writes, into the results directory:
  report.md    what holds throughout (the one-seed notice, the sign convention) once, the
               findings (the published claims the studies can test, with verdicts), then one
               section per study (its record in studies/<name>.json): setup lines, and per
               model its parts' figures and tables, every number with its 95 % interval over
               seeds and the published numbers beside it
  figures/     <study>/norms_<model>_b<N>.png, batch_size_<model>.png, batch_curves_<model>.png,
               groups_<model>.png, zoo_<model>.png (an earlier report's that this one does not
               draw are removed)
  results.csv  one row per run (config and summary); curves.csv: one row per run and epoch

Modules: runs (reading run directories), studies (the study records and their runs), labels
(norm names and styles), tables, figures, published (numbers from references.yaml beside the
study's), findings (claims and verdicts), sections (one per part of a study), tidy (the CSV
files, load_results), build (putting it together).
"""
from .build import build_report
from .tidy import load_results

__all__ = ["build_report", "load_results"]
