"""`normlab search-groups`: which GN grouping is best, found by successive halving.

    candidates.py  every distinct grouping of the stage widths (LN ... IN)
    plan.py        the settings, checked; rungs, trial order, cost estimate, --dry-run text
    trials.py      Optuna's study in the search directory; taking, adopting and running trials
    workers.py     W worker processes in one command
    results.py     ranking with intervals, winner, margins, test error, compute; search.json/.md
"""
