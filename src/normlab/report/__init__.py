"""The report: a pure function of run directories (never trains, never needs the data set).

`build_report(results)` writes, into the results directory:
  report.md    what holds throughout (the one-seed notice, the sign convention) once, the
               findings (the published claims the studies can test, with verdicts), then one
               section per study (its record in studies/<name>.json): setup lines, and per
               setup (runs equal but for norm, batch and seed) its parts' figures and tables, every number with its 95 % interval over
               seeds and the published numbers beside it
  figures/     <study>/norms_<setup>_b<N>.png, batch_size_<setup>.png, batch_curves_<setup>.png,
               groups_<setup>.png, zoo_<setup>.png (<setup>: the model, tagged when it has
               several setups; an earlier report's that this one does not draw are removed)
  results.csv  one row per run (config and summary); curves.csv: one row per run and epoch

Modules: runs (reading run directories), studies (the study records and their runs), setups
(the runs of a study that may be compared with each other), labels
(norm names and styles), tables, figures, published (numbers from references.yaml beside the
study's), findings (claims and verdicts), sections (one per part of a study), tidy (the CSV
files, load_results), build (putting it together).
"""
from .build import build_report
from .tidy import load_results

__all__ = ["build_report", "load_results"]
