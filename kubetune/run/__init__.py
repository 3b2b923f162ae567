"""The run contract between the operator, local mode and the runtimes."""
