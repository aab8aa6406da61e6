"""The report: a pure function of run directories (never trains, never needs the data set).

`build_report(results)` writes, into the results directory:
  report.md    findings first (the published claims this study can test, with verdicts),
               then the setup and one section per study and model, every number with its
               95 % interval over seeds and the published numbers beside it
  figures/     norms_<model>_b<N>.png, batch_size_<model>.png, batch_curves_<model>.png,
               groups_<model>.png
  results.csv  one row per run (config and summary); curves.csv: one row per run and epoch

Modules: runs (reading run directories), labels (norm names and styles), tables, figures,
published (numbers from references.yaml beside the study's), findings (claims and verdicts),
sections (one per study), tidy (the CSV files, load_results), build (putting it together).
"""
from .build import build_report
from .tidy import load_results

__all__ = ["build_report", "load_results"]
