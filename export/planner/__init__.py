"""The planner: doit's side of the build (graph, keys, plan, commands, progress, reports). Never imports torch."""
