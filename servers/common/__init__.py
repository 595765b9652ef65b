"""The runtime every agentmesh service shares: config, errors, interceptors, bootstrap, database."""
