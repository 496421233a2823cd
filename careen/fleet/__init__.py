"""careen fleet: plan, run, retire and roll back the refit of many Glance images.

`select` turns operators' filters into Glance queries and checks; `plan` writes what a
run will do; `state` is the run's SQLite record; `task` is the one function that refits
an image, whoever runs it; `run` hands tasks out and reconciles with Glance.
"""
