"""The step side: the worker process, the steps it runs, steps on a Dask cluster."""
