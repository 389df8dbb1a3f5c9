"""Studies: runs of many trainings or samplings whose results become a table in docs/.

Every study has one shape: a typed spec (what to run, checked before anything runs), a runner (the
trainings / samplings, through the package's entry points), a report (table, plots); ``main``
maps the command line onto the spec, and tools/<study>.py is a shell over it.

reproduce_routing.py  the paper's routing comparison (Table 3) on digits, with error bars: spec, runner
  routing_eval.py     ... evaluation of one trained run (its own process)
  routing_report.py   ... the table, the paired orderings, the plot, the generated doc section
scaling_study.py      one fixed model across node counts and expert-parallel layouts: spec, runner
  scaling_report.py   ... the results table (CSV / Markdown / JSON) and plots
threshold_sweep.py    dynamic-inference thresholds -> activated compute vs quality (one file)
common.py             what the studies share: launching, versions, Markdown tables, atomic JSON
"""
