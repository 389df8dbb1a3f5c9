"""Studies: runs of many trainings or samplings whose results become a table in docs/.

reproduce_routing.py  the paper's routing comparison (Table 3) on digits, with error bars
scaling_study.py      one fixed model across node counts and expert-parallel layouts
threshold_sweep.py    dynamic-inference thresholds -> activated compute vs quality
"""
