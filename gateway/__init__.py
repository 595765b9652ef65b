"""What Envoy needs beyond envoy.yaml: rendering it, the edge Lua filter, and supervising Envoy."""
