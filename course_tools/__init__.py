"""The course's own authoring tools: lint, mutants, grading checks, the demo and the JupyterLab launcher."""
