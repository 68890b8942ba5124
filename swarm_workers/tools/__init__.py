"""Tools the agent loop may call: the interface, and the MCP-backed registry."""
