"""Post-market monitoring: how the model really performs at this site (verdicts and
outcomes against its results) and whether its inputs drifted."""
