"""Comparing finished runs (`comparison`) and drawing PNG plots of runs and evaluations (`plots`).

Plain Python on the files a run folder holds: nothing here imports torch, so comparing or plotting
the runs of a cluster works on any machine with moectl installed."""
